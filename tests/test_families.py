"""Qwen3, Gemma 2, Gemma 3 (text) and Llama 3 (RoPE scaling 'llama3') against transformers.

Tiny random transformers models with every weight redrawn, windows shorter than the texts and
sliding-window layers mixed with global ones, are saved with `save_pretrained` and imported by
`gembed import`: causal from that config.json, bidirectional from it with the flag the family's
transformers class reads (`is_causal: false`; Gemma 3: `use_bidirectional_attention: true`).
Hidden states must match transformers' on every real token (≤ 1e-4) in right- and left-padded
batches (left: positions counted from each row's first real token, as transformers needs
`position_ids` for) and, bidirectional, in packed rows; the embeddings of
`gembed.load(...).encode` must match transformers' hidden states pooled by hand, and the
sentence-transformers export must load into transformers' AutoModel with the same hidden states
and import back bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

import gembed
from gembed import cli
from gembed.model import Encoder
from gembed.model_folder import read_model_folder
from test_import import DECODER_SPECIAL, TEXTS, WORDS, write_decoder_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
TEXTS_FAMILIES = TEXTS + ["w3 w1 w4 w1 w5 w9 w2 w6", " ".join(WORDS[5:25])]
COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=96, vocab_size=len(DECODER_SPECIAL) + len(WORDS),
              rms_norm_eps=1e-6, max_position_embeddings=64, attn_implementation="eager",
              tie_word_embeddings=False)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
FAMILIES = {
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=4, layer_types=SLIDING,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    "gemma2": ("Gemma2Config", dict(sliding_window=4, layer_types=SLIDING, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=1.5, final_logit_softcapping=30.0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    "gemma3_text": ("Gemma3TextConfig", dict(
        sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "llama": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256})),
}
# The flag that makes each family's transformers class bidirectional.
BIDIRECTIONAL_FLAG = {"qwen3": {"is_causal": False}, "gemma2": {"is_causal": False},
                      "gemma3_text": {"use_bidirectional_attention": True},
                      "llama": {"is_causal": False}}
# Fields whose removal must change the hidden states: what the parity checks is not vacuous.
ABLATIONS = {
    "qwen3": {"local_layers": ()},
    "gemma2": {"local_layers": (), "attention_logit_softcap": None, "query_pre_attn_scalar": None},
    "gemma3_text": {"local_layers": (), "rope_local_theta": None, "rope_scaling": "none",
                    "query_pre_attn_scalar": None},
    "llama": {"rope_scaling": "none"},
}


def random_model(model_type: str):
    """A tiny transformers causal LM of the family with every weight redrawn."""
    config_class, fields = FAMILIES[model_type]
    config = getattr(transformers, config_class)(**COMMON, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1)
            if name.endswith("norm.weight") and not model_type.startswith("gemma"):
                param.add_(1.0)   # Gemma's norms scale by (1 + w)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(model_type, {attention: (transformers base model, imported model folder)})."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = random_model(model_type)
    models = {"causal": model.model}
    model.save_pretrained(root / "causal-source")
    write_decoder_tokenizer(root / "causal-source")
    # save_pretrained drops is_causal: the flag goes into config.json as published models have it.
    (root / "bidirectional-source").mkdir()
    for path in (root / "causal-source").iterdir():
        (root / "bidirectional-source" / path.name).write_bytes(path.read_bytes())
    config = json.loads((root / "causal-source" / "config.json").read_text())
    (root / "bidirectional-source" / "config.json").write_text(
        json.dumps({**config, **BIDIRECTIONAL_FLAG[model_type]}))
    models["bidirectional"] = transformers.AutoModel.from_pretrained(
        root / "bidirectional-source", attn_implementation="eager").eval()
    # causal: the default (last-token) pooling; bidirectional: mean pooling and a projection.
    assert cli.main(["import", f"--source={root / 'causal-source'}",
                     f"--output={root / 'causal'}"]) == 0
    assert cli.main(["import", f"--source={root / 'bidirectional-source'}",
                     f"--output={root / 'bidirectional'}", "--pooling=mean",
                     "--projection_dim=16"]) == 0
    return model_type, {attention: (models[attention], root / attention) for attention in models}


def padded_batch(ids: list[list[int]], left: bool):
    """int64[B, L] ids (pad 0), bool[B, L] mask, int64[B, L] positions of the real tokens."""
    length = max(map(len, ids))
    token_ids = np.zeros((len(ids), length), np.int64)
    mask = np.zeros((len(ids), length), bool)
    for row, sequence in enumerate(ids):
        start = length - len(sequence) if left else 0
        token_ids[row, start:start + len(sequence)] = sequence
        mask[row, start:start + len(sequence)] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return token_ids, mask, positions


def hidden_state_differences(peer, model_dir: pathlib.Path, model_config=None,
                             sides=("right", "left")) -> dict[str, float]:
    """{padding side: max |gembed - transformers| over real tokens} of TEXTS_FAMILIES."""
    folder = read_model_folder(model_dir)
    model_config = model_config or folder.model_config
    ids = folder.tokenizer.encode(TEXTS_FAMILIES, folder.max_length)
    differences = {}
    for side in sides:
        token_ids, mask, positions = padded_batch(ids, left=side == "left")
        ours = np.asarray(Encoder(model_config).apply(
            {"params": folder.params["encoder"]}, token_ids.astype(np.int32), mask,
            positions=positions.astype(np.int32)))
        with torch.no_grad():
            theirs = peer(input_ids=torch.tensor(token_ids), attention_mask=torch.tensor(mask).long(),
                          position_ids=torch.tensor(positions)).last_hidden_state.numpy()
        differences[side] = float(np.abs(ours - theirs)[mask].max())
    return differences


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_hidden_states_match_transformers_right_and_left_padded(family, attention):
    model_type, imported = family
    peer, model_dir = imported[attention]
    config = read_model_folder(model_dir).model_config
    assert config.attention_mask == attention and config.local_layers == (
        () if model_type == "llama" else tuple(i for i, kind in enumerate(
            peer.config.layer_types) if kind == "sliding_attention"))
    differences = hidden_state_differences(peer, model_dir)
    print(f"{model_type} {attention}: max |hidden diff| right {differences['right']:.2e} "
          f"left {differences['left']:.2e}")
    assert max(differences.values()) <= TOLERANCE
    for field, value in ABLATIONS[model_type].items():   # each feature shows in the states
        ablated = dataclasses.replace(config, **{field: value})
        assert hidden_state_differences(peer, model_dir, ablated, ["right"])["right"] > 1e-3, field


def test_packed_rows_match_transformers_texts_alone(family):
    """Two rows holding all texts back to back (segment ids, per-text positions): every text's
    states are transformers' of the right-padded batch, windows and bidirectional keys included."""
    model_type, imported = family
    peer, model_dir = imported["bidirectional"]
    folder = read_model_folder(model_dir)
    ids = folder.tokenizer.encode(TEXTS_FAMILIES, folder.max_length)
    rows = [[0, 2, 4, 5], [1, 3]]   # text indices per packed row
    length = max(sum(len(ids[t]) for t in row) for row in rows)
    token_ids, segment_ids, positions = (np.zeros((2, length), np.int32) for _ in range(3))
    mask = np.zeros((2, length), bool)
    for r, row in enumerate(rows):
        start = 0
        for t in row:
            end = start + len(ids[t])
            token_ids[r, start:end], segment_ids[r, start:end] = ids[t], t
            positions[r, start:end], mask[r, start:end] = np.arange(len(ids[t])), True
            start = end
    packed = np.asarray(Encoder(folder.model_config).apply(
        {"params": folder.params["encoder"]}, token_ids, mask, segment_ids=segment_ids,
        positions=positions))
    right, right_mask, _ = padded_batch(ids, left=False)
    with torch.no_grad():
        theirs = peer(input_ids=torch.tensor(right), attention_mask=torch.tensor(right_mask).long()
                      ).last_hidden_state.numpy()
    difference = max(float(np.abs(packed[r][segment_ids[r] == t][:len(ids[t])]
                                  - theirs[t, :len(ids[t])]).max())
                     for r, row in enumerate(rows) for t in row)
    print(f"{model_type} bidirectional packed: max |hidden diff| {difference:.2e}")
    assert difference <= TOLERANCE


def test_bidirectional_flag_and_import_flag_give_one_architecture(family, tmp_path):
    model_type, imported = family
    assert cli.main(["import", f"--source={imported['causal'][1].parent / 'causal-source'}",
                     f"--output={tmp_path / 'forced'}", "--attention=bidirectional",
                     "--pooling=mean", "--projection_dim=16"]) == 0
    forced = read_model_folder(tmp_path / "forced").model_config
    assert forced == read_model_folder(imported["bidirectional"][1]).model_config


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_encode_matches_transformers_pooled_by_hand(family, attention):
    model_type, imported = family
    peer, model_dir = imported[attention]
    model = gembed.load(model_dir)
    ids = model.tokenizer.encode(TEXTS_FAMILIES, model.max_length,
                                 add_eos=model.model_config.pooling == "last")
    token_ids, mask, positions = padded_batch(ids, left=True)
    with torch.no_grad():
        hidden = peer(input_ids=torch.tensor(token_ids), attention_mask=torch.tensor(mask).long(),
                      position_ids=torch.tensor(positions)).last_hidden_state.numpy()
    if model.model_config.pooling == "mean":
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    else:
        pooled = hidden[:, -1]   # left padding: the last token of every row is real
    if model.model_config.projection_dim is not None:
        projection = model.params["projection"]
        pooled = pooled @ np.asarray(projection["kernel"]) + np.asarray(projection["bias"])
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    difference = float(np.abs(model.encode(TEXTS_FAMILIES) - pooled).max())
    print(f"{model_type} {attention} {model.model_config.pooling}-pooled: max |embedding diff| "
          f"{difference:.2e}")
    assert difference <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_export_loads_into_transformers_and_imports_back(family, attention, tmp_path):
    model_type, imported = family
    _, model_dir = imported[attention]
    assert cli.main(["export", f"--checkpoint={model_dir}", f"--output={tmp_path / 'st'}",
                     "--format=sentence-transformers"]) == 0
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert config["model_type"] == model_type
    peer = transformers.AutoModel.from_pretrained(tmp_path / "st", attn_implementation="eager").eval()
    differences = hidden_state_differences(peer, model_dir)
    print(f"{model_type} {attention} export: max |hidden diff| {max(differences.values()):.2e}")
    assert max(differences.values()) <= TOLERANCE
    assert cli.main(["import", f"--source={tmp_path / 'st'}", f"--output={tmp_path / 'back'}"]) == 0
    before, after = read_model_folder(model_dir), read_model_folder(tmp_path / "back")
    assert after.model_config == before.model_config
    for name, value in before.params["encoder"].items():
        np.testing.assert_equal(after.params["encoder"][name], value)
