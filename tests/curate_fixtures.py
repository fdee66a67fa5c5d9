"""A tiny random Llama-family decoder folder (config.json, model.safetensors, a byte-level BPE
tokenizer.json trained on the texts given) for the curation tests and benchmark; no torch."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable

import numpy as np
import safetensors.numpy
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def write_bpe_tokenizer(root: pathlib.Path, texts: Iterable[str], vocab_size: int) -> int:
    """Trains a byte-level BPE that prepends <s> (like Llama's); returns its vocabulary size."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return tokenizer.get_vocab_size()


def write_tiny_llama(root: pathlib.Path, texts: Iterable[str], *, hidden: int = 32,
                     layers: int = 2, vocab_size: int = 320, seed: int = 0) -> pathlib.Path:
    """A random Llama (GQA, untied LM head) with a BPE tokenizer trained on `texts`."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = write_bpe_tokenizer(root, texts, vocab_size)
    heads, kv_heads, head_dim, mlp = 4, 2, hidden // 4, 2 * hidden
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": mlp,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
              "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {f"{p}input_layernorm.weight": (hidden,),
                   f"{p}post_attention_layernorm.weight": (hidden,),
                   f"{p}self_attn.q_proj.weight": (heads * head_dim, hidden),
                   f"{p}self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   f"{p}self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                   f"{p}self_attn.o_proj.weight": (hidden, heads * head_dim),
                   f"{p}mlp.gate_proj.weight": (mlp, hidden), f"{p}mlp.up_proj.weight": (mlp, hidden),
                   f"{p}mlp.down_proj.weight": (hidden, mlp)}
    rng = np.random.default_rng(seed)
    weights = {name: (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
                      else 0.3 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in shapes.items()}
    safetensors.numpy.save_file(weights, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config))
    return root
