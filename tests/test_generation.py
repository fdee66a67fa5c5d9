"""Causal-LM inference (`gembed.generation`, `gembed.llm`) against transformers on tiny random
Llama / Qwen2 / Gemma / Gemma 2 models saved as safetensors: greedy generation gives `generate`'s token ids,
continuation log-probabilities match its logits, and batching, left or right padding and stop
tokens change nothing; top-p sampling against a NumPy nucleus; chat templates as transformers
renders them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from curate_fixtures import write_tiny_llama
from gembed.chat_template import compile_chat_template, render_user_turn
from gembed.generation import top_p_filter
from gembed.llm import load_language_model

VOCAB = 96
NEW_TOKENS = 32
PROMPT_LENGTHS = (3, 9, 14, 6)


def write_word_tokenizer(root: pathlib.Path) -> None:
    """Words t3..t95 plus <pad>=0, <s>=1 (prepended), </s>=2."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, VOCAB)}
    tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


def random_transformers_model(model_type: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config
                    }[model_type]
    # Gemma 2: a sliding window shorter than the prompts, both soft-caps low enough to bite.
    extra = dict(sliding_window=4, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
                 query_pre_attn_scalar=24) if model_type == "gemma2" else {}
    config = config_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128,
                          vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=128,
                          rope_theta=1000.0, attn_implementation="eager", bos_token_id=1,
                          eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # large enough logits that greedy choices are not near-ties
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.3 if "embed" in name or "lm_head" in name else 0.1)
            if name.endswith("norm.weight") and not model_type.startswith("gemma"):
                param.add_(1.0)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma", "gemma2"])
def family(request, tmp_path_factory):
    """(transformers model, LanguageModel without stop tokens, prompts) of one family."""
    model = random_transformers_model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root, safe_serialization=True)
    write_word_tokenizer(root)
    llm = dataclasses.replace(load_language_model(str(root), batch_size=4), stop_ids=())
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, VOCAB, n - 1).tolist() for n in PROMPT_LENGTHS]
    return request.param, model, llm, prompts


def transformers_greedy(model, prompt: list[int], eos: int | None = None) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers_generate(family):
    model_type, model, llm, prompts = family
    ours = llm.generate_ids(prompts, max_new_tokens=NEW_TOKENS)
    reference = [transformers_greedy(model, p) for p in prompts]
    agreeing = [o == r for o, r in zip(ours, reference)]
    print(f"{model_type}: {sum(agreeing)}/{len(prompts)} prompts, {NEW_TOKENS} greedy tokens equal")
    assert all(len(o) == NEW_TOKENS for o in ours)
    assert ours == reference


def test_batching_and_padding_side_do_not_change_generation(family):
    """One call for all prompts, left- or right-padded, gives what one call per prompt gives."""
    _, _, llm, prompts = family
    left = llm.generate_ids(prompts, max_new_tokens=NEW_TOKENS)
    assert llm.generate_ids(prompts, max_new_tokens=NEW_TOKENS, padding="right") == left
    assert [llm.generate_ids([p], max_new_tokens=NEW_TOKENS)[0] for p in prompts] == left


def test_sampled_tokens_depend_on_the_seed_and_sample_id_only(family):
    model_type, _, llm, prompts = family
    if model_type != "llama":
        pytest.skip("one family suffices: sampling does not depend on the architecture")
    sample = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, seed=5)
    left = llm.generate_ids(prompts, **sample)
    assert llm.generate_ids(prompts, padding="right", **sample) == left
    assert [llm.generate_ids([p], sample_ids=[i], **sample)[0]
            for i, p in enumerate(prompts)] == left
    assert llm.generate_ids(prompts, **{**sample, "seed": 6}) != left
    assert left != llm.generate_ids(prompts, max_new_tokens=NEW_TOKENS)   # not greedy


def test_stop_tokens_end_generation_like_transformers(family):
    model_type, model, llm, prompts = family
    if model_type != "llama":
        pytest.skip("one family suffices: stopping does not depend on the architecture")
    unstopped = llm.generate_ids(prompts, max_new_tokens=NEW_TOKENS)
    stop = next(t for i, t in enumerate(unstopped[1]) if i >= 4 and t not in unstopped[1][:i])
    stopping = dataclasses.replace(llm, stop_ids=(stop,))
    ours = stopping.generate_ids(prompts, max_new_tokens=NEW_TOKENS)
    reference = [transformers_greedy(model, p, eos=stop) for p in prompts]
    reference = [r[:r.index(stop) + 1] if stop in r else r for r in reference]   # drop the pads
    assert ours == reference
    assert ours[1][-1] == stop and len(ours[1]) < NEW_TOKENS


def test_continuation_log_probs_match_transformers(family):
    import torch

    model_type, model, llm, prompts = family
    rng = np.random.default_rng(1)
    continuations = [rng.integers(3, VOCAB, n).tolist() for n in (4, 1, 7, 2)]
    ours = llm.continuation_log_probs_of_ids(prompts, continuations)
    one_by_one = [llm.continuation_log_probs_of_ids([p], [c])[0]
                  for p, c in zip(prompts, continuations)]
    next_token = llm.next_token_log_probs([" ".join(f"t{t}" for t in p[1:]) for p in prompts],
                                          list(range(VOCAB)))
    worst = worst_sum = worst_next = worst_batch = 0.0
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1).numpy()
        positions = np.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
        reference = log_probs[positions, continuation]
        worst = max(worst, np.abs(ours[i] - reference).max())
        worst_sum = max(worst_sum, abs(ours[i].sum() - reference.sum()))
        worst_next = max(worst_next, np.abs(next_token[i] - log_probs[len(prompt) - 1]).max())
        worst_batch = max(worst_batch, np.abs(ours[i] - one_by_one[i]).max())
    print(f"{model_type}: continuation log p max abs diff {worst:.2e} per token, {worst_sum:.2e} "
          f"per sum; next-token {worst_next:.2e}; batched vs one-by-one {worst_batch:.2e}")
    assert worst <= 1e-4 and worst_sum <= 1e-4 and worst_next <= 1e-4 and worst_batch <= 1e-5


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32))
    for top_p, nucleus in ((0.35, {1}), (0.5, {1, 3}), (0.69, {1, 3}), (0.71, {1, 3, 4}),
                           (0.99, {0, 1, 2, 3, 4})):
        kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), top_p)))
        assert set(np.flatnonzero(kept)) == nucleus, top_p


def test_sampling_draws_from_the_renormalised_nucleus():
    from gembed.generation import sample_tokens

    probabilities = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = jnp.asarray(np.log(probabilities), jnp.float32)[None].repeat(20000, axis=0)
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    draws = np.asarray(sample_tokens(logits, keys, jnp.int32(3), temperature=1.0, top_p=0.8))
    frequencies = np.bincount(draws, minlength=5) / len(draws)
    expected = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
    np.testing.assert_allclose(frequencies, expected, atol=0.015)
    halved = np.asarray(sample_tokens(logits, keys, jnp.int32(3), temperature=0.5, top_p=1.0))
    sharpened = probabilities ** 2 / np.sum(probabilities ** 2)
    np.testing.assert_allclose(np.bincount(halved, minlength=5) / len(halved), sharpened, atol=0.015)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
         "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


@pytest.mark.parametrize("template", [CHATML, GEMMA], ids=["chatml", "gemma"])
def test_chat_template_renders_like_transformers(template, tmp_path):
    transformers = pytest.importorskip("transformers")
    write_word_tokenizer(tmp_path)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = template
    text = "Rate the passage.\n\nQuery: t5 t6  "
    reference = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True)
    ours = render_user_turn(compile_chat_template(template, tmp_path), text,
                            {"bos_token": "<s>", "eos_token": "</s>"})
    assert ours == reference


@pytest.mark.slow
def test_generation_under_fsdp_rules_on_a_mesh_matches_one_device(tmp_path):
    """Params placed by experiments/configs/sharding/fsdp.gin's rules over 4 CPU devices."""
    if jax.device_count() < 4:   # rerun this test in a process with 4 CPU devices
        script = (f"import sys, pytest; sys.exit(pytest.main([{str(pathlib.Path(__file__))!r}, "
                  f"'-q', '-k', 'fsdp_rules', '-p', 'no:cacheprovider']))")
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True,
            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
        assert result.returncode == 0 and "1 passed" in result.stdout, (
            result.stdout[-3000:] + result.stderr[-3000:])
        return
    import gin

    from gembed import sharding

    folder = write_tiny_llama(tmp_path / "llm", [f"word{i} and more words {i * i}" for i in range(50)],
                              vocab_size=300)
    gin.parse_config_file(str(pathlib.Path(__file__).parents[1] / "experiments" / "configs"
                              / "sharding" / "fsdp.gin"))
    mesh = sharding.make_mesh(model_parallelism=2)
    sharded = load_language_model(str(folder), batch_size=4, mesh=mesh,
                                  param_rules=sharding.ShardingConfig().param_rules)
    assert any(len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded.params))
    llm = load_language_model(str(folder), batch_size=4)
    prompts = llm.prompt_ids(["word1 and", "more words word7 and more", "4"])
    assert sharded.generate_ids(prompts, max_new_tokens=8) == llm.generate_ids(prompts, max_new_tokens=8)
    continuations = llm.text_ids([" more", " words 9", " and"])
    for a, b in zip(sharded.continuation_log_probs_of_ids(prompts, continuations),
                    llm.continuation_log_probs_of_ids(prompts, continuations)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    scores = sharded.next_token_log_probs(["word1 and", "4"], [5, 6, 7])
    np.testing.assert_allclose(scores, llm.next_token_log_probs(["word1 and", "4"], [5, 6, 7]),
                               atol=1e-5)
