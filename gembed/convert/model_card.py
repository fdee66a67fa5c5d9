"""The README.md model card of a sentence-transformers export: what the model is, how it was
trained (the workdir's operative config.gin and soup.json), its `gembed eval` scores when they
exist, and how to use it from gembed, sentence-transformers, transformers and TEI.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

from gembed import checkpoint
from gembed.convert.weight_table import Family
from gembed.model import ModelConfig

CONFIG_FILE = "gembed_config.json"
SUMMARY_MACROS = ("TRAIN_DATA", "INIT_FROM", "TRAIN_STEPS", "BATCH_SIZE", "MAX_LENGTH",
                  "LEARNING_RATE", "SEED", "CHUNK_SIZE")
# What serves each family in text-embeddings-inference (its router and candle backend, v1.9):
# (what the card says, the docker image tag or None when TEI does not serve it).
TEI_SUPPORT = {
    "bert": ("served on CPU and GPU.", "cpu-1.9"),
    "megatron-bert": ("not served: TEI has no Megatron-BERT model; use sentence-transformers.",
                      None),
    "llama": ("served on CUDA GPUs with flash attention only (TEI >= 1.9.0 reads "
              "`use_bidirectional_attention`).", "1.9"),
    "qwen2": ("served on CUDA GPUs with flash attention only (TEI >= 1.9.0 reads `is_causal`).",
              "1.9"),
    "gemma": ("not served: TEI has Gemma 3 (`gemma3_text`) but no Gemma (1) model.", None),
}
FAMILY_NOTES = {
    "qwen2": "For `model_type: qwen2`, transformers 5 loads the tokenizer as `Qwen2Tokenizer`, "
             "which rebuilds Qwen2's normalizer (NFC) and pre-tokenizer from code whatever "
             "tokenizer.json says; a model imported from a Qwen2 checkpoint keeps that tokenizer, "
             "so the ids agree. TEI and `tokenizers` read tokenizer.json as it is.",
}
MODEL_ARCHITECTURE_SECTION = re.compile(r"# Parameters for ModelConfig:\n.*?(?=# Parameters for |\Z)", re.S)
BIDIRECTIONAL_NOTE = """\
This decoder was trained **without the causal mask**. `config.json` says so twice:
`"is_causal": false` and `"use_bidirectional_attention": true`. Which loaders honour them:

| loader | honours the flags |
|---|---|
| transformers >= 5.2 (`LlamaModel`, `Qwen2Model`, `GemmaModel`) | yes: `is_causal: false` builds a bidirectional mask; checked on 5.24 with `sdpa` and `eager` attention, padded and unpadded batches |
| transformers 5.24, `use_bidirectional_attention` alone | no for `LlamaModel` and `Qwen2Model`; `GemmaModel` only with `sdpa` on unpadded batches |
| transformers < 5.2 | `is_causal` is ignored: the model silently runs **causal** and its vectors are wrong (sentence-transformers warns) |
| TEI >= 1.9.0 | Qwen2 reads `is_causal`, Llama reads `use_bidirectional_attention`; older TEI runs them causal |
"""


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """Everything the card says. Provenance comes from `provenance`; the exporter adds the rest."""

    source: str
    name: str = ""
    step: int | None = None
    imported_from: str | None = None
    training_config: str | None = None
    training_config_path: str | None = None
    soup: dict[str, Any] | None = None
    eval_results: dict[str, dict[str, float]] | None = None
    eval_results_path: str | None = None
    family: Family | None = None
    model: ModelConfig | None = None
    max_length: int = 0
    task_prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    output_sizes: list[int] = dataclasses.field(default_factory=list)
    tokenizer_kind: str = ""
    num_params: int = 0
    causal_flags: bool = False    # config.json carries is_causal / use_bidirectional_attention


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _eval_row(path: pathlib.Path) -> tuple[dict | None, str | None]:
    """The scores of `path` in a recipe's DIR/eval/results.json ({row: {task: scores}})."""
    results_path = path.parent / "eval" / "results.json"
    rows = _read_json(results_path) or {}
    for row, scores in rows.items():
        if row == path.name or row.startswith(f"{path.name} ("):
            return scores, str(results_path)
    return None, None


def provenance(path: pathlib.Path, eval_results: str | pathlib.Path | None) -> ModelCard:
    """The card's provenance of a CKPT or model folder: its training workdir's config.gin,
    soup.json, and evaluation scores (`eval_results`, or the recipe's row of `path`)."""
    path = path.resolve()
    step, imported_from, workdir = None, None, None
    folder_config = _read_json(path / CONFIG_FILE)
    if folder_config is not None:
        origin = folder_config.get("source") or {}
        if origin.get("checkpoint"):
            workdir, step = pathlib.Path(origin["checkpoint"]).parent.parent, origin.get("step")
        imported_from = origin.get("hub") or origin.get("path")
    else:
        ref = checkpoint.resolve(path)
        workdir, step = ref.workdir, ref.step
    soup = _read_json(workdir / "soup.json") if workdir else None
    config_dir = workdir
    if soup and soup.get("kept"):
        config_dir = pathlib.Path(soup["kept"][0]).parent.parent
    config_path = config_dir / "config.gin" if config_dir else None
    training_config = config_path.read_text() if config_path and config_path.is_file() else None
    if eval_results is not None:
        scores, scores_path = _read_json(pathlib.Path(eval_results)), str(eval_results)
    else:
        scores, scores_path = _eval_row(path)
    return ModelCard(source=str(path), step=step, imported_from=imported_from,
                     training_config=training_config,
                     training_config_path=str(config_path) if training_config else None,
                     soup=soup, eval_results=scores, eval_results_path=scores_path)


def _macros(config: str) -> dict[str, str]:
    """The contract macros and the mixture's datasets ("TRAIN_DATA (NAME)") bound in an
    operative config.gin (gin wraps a long binding as `NAME = \\` and the value on the next line)."""
    found = {}
    for line in re.sub(r"\\\n\s*", "", config).splitlines():
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*) = (.+)", line.strip())
        if match and match.group(1) in SUMMARY_MACROS:
            found[match.group(1)] = match.group(2)
        dataset = re.fullmatch(r"(\w+)/DatasetSpec\.data = (.+)", line.strip())
        if dataset:
            found[f"TRAIN_DATA ({dataset.group(1)})"] = dataset.group(2)
    return found


def _model_table(card: ModelCard) -> list[str]:
    model, family = card.model, card.family
    attention = ("bidirectional" if model.attention_mask == "bidirectional" else "causal")
    rows = [
        ("architecture", f"`{family.architecture}` (transformers `model_type: {family.model_type}`): "
                         f"{model.num_layers} layers, hidden {model.hidden_size}, "
                         f"{model.num_heads} heads ({model.effective_num_kv_heads} key/value), "
                         f"MLP {model.mlp_dim} ({'gated ' if model.mlp_gated else ''}"
                         f"{model.mlp_activation}), {model.norm} {model.norm_position}-norm, "
                         f"{model.position_embedding} positions"),
        ("parameters", f"{card.num_params:,} (encoder)"),
        ("attention", attention),
        ("pooling", {"mean": "mean of all tokens", "first": "first token",
                     "last": "last token (the tokenizer appends the end token)"}[model.pooling]),
        ("projection", f"{model.hidden_size} -> {model.projection_dim} (`2_Dense`, identity "
                       f"activation)" if model.projection_dim else "none"),
        ("embedding size", f"{model.embedding_size}, L2-normalised"),
        ("Matryoshka sizes", ", ".join(map(str, card.output_sizes)) + " (keep a prefix, "
                             "renormalise; `truncate_dim` in sentence-transformers)"),
        ("max sequence length", f"{card.max_length} tokens (longer texts are truncated)"),
        ("similarity", "cosine"),
        ("tokenizer", "SentencePiece unigram as a tokenizer.json Unigram (same ids)"
         if card.tokenizer_kind == "sentencepiece" else "the source model's tokenizer.json"),
        ("prompts", ", ".join(f"`{name}`: {prompt!r}" for name, prompt in card.task_prompts.items())
         or "none"),
    ]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def _training(card: ModelCard) -> list[str]:
    lines = ["## Training", ""]
    if card.imported_from:
        lines.append(f"Imported from `{card.imported_from}` with `gembed import`.")
    if card.step is not None:
        lines.append(f"Exported from `{card.source}` (step {card.step}).")
    if card.soup:
        kept = card.soup.get("kept", [])
        score = card.soup.get("score")
        lines.append(f"A {card.soup.get('method')} model soup of {len(kept)} of "
                     f"{len(card.soup.get('ingredients', []))} checkpoints"
                     + (f" ({card.soup.get('eval_task')}: {score:.2f})" if score is not None else "")
                     + ": " + ", ".join(f"`{k}`" for k in kept) + ".")
    if card.training_config:
        macros = _macros(card.training_config)
        # The run's architecture is the Model table's (the workdir's model_config.json); the gin
        # ModelConfig bindings need not be it (INIT_FROM a model folder fixes the architecture).
        config = MODEL_ARCHITECTURE_SECTION.sub("", card.training_config).strip()
        lines += ["", "| setting | value |", "|---|---|",
                  *(f"| {name} | `{value}` |" for name, value in macros.items()), "",
                  f"<details><summary>operative config ({card.training_config_path}; its "
                  f"ModelConfig bindings left out, see Model)</summary>",
                  "", "```", config, "```", "", "</details>"]
    if len(lines) == 2:
        lines.append("No training record was found next to the exported model.")
    return lines + [""]


def _evaluation(card: ModelCard) -> list[str]:
    if not card.eval_results:
        return []
    lines = ["## Evaluation", "", f"`gembed eval` scores (0-100, MTEB main scores; "
             f"{card.eval_results_path}):", "", "| task | main score |", "|---|---|"]
    lines += [f"| {task} | {scores['main_score']:.2f} |" for task, scores in card.eval_results.items()
              if isinstance(scores, dict) and "main_score" in scores]
    return lines + [""]


def _usage(card: ModelCard) -> list[str]:
    model = card.model
    prompt = next(iter(card.task_prompts), None)
    prompt_arg = f', prompt_name="{prompt}"' if prompt else ""
    dim = card.output_sizes[0]
    pooling = {
        "mean": "(hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)",
        "first": "hidden[:, 0]",
        "last": "hidden[torch.arange(len(hidden)), mask.sum(1) - 1]   # right padding",
    }[model.pooling]
    projection = ("\ndense = load_file(f\"{path}/2_Dense/model.safetensors\")\n"
                  "pooled = pooled @ dense[\"linear.weight\"].T"
                  + (" + dense[\"linear.bias\"]" if model.projection_bias else "")
                  if model.projection_dim else "")
    return [
        "## Usage", "",
        "sentence-transformers:", "", "```python",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(PATH)",
        f"embeddings = model.encode(texts{prompt_arg})",
        f"short = SentenceTransformer(PATH, truncate_dim={dim})   # a Matryoshka prefix",
        "```", "",
        "transformers, pooling by hand:", "", "```python",
        "import torch, torch.nn.functional as F",
        "from safetensors.torch import load_file",
        "from transformers import AutoModel, AutoTokenizer",
        "path = PATH",
        "tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)",
        f"batch = tokenizer(texts, padding=True, truncation=True, max_length={card.max_length}, "
        "return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    hidden = model(**batch).last_hidden_state",
        "mask = batch[\"attention_mask\"]",
        f"pooled = {pooling}{projection}",
        "embeddings = F.normalize(pooled, dim=-1)",
        "```", "",
        "gembed (back to a gembed model folder, the same params bit for bit):", "", "```",
        "gembed import --source=PATH --output=MODEL_DIR",
        "```", "", "```python",
        "import gembed",
        f"embeddings = gembed.load(MODEL_DIR).encode(texts{', task=' + repr(prompt) if prompt else ''})",
        "```", "",
    ] + _tei(card.family.model_type)


def _tei(model_type: str) -> list[str]:
    support, image = TEI_SUPPORT.get(model_type, ("not checked for this architecture.", None))
    lines = [f"text-embeddings-inference: {support}", ""]
    if image is not None:
        lines += ["```", f"docker run -p 8080:80 -v $PWD:/data "
                         f"ghcr.io/huggingface/text-embeddings-inference:{image} --model-id /data/PATH",
                  "```", ""]
    return lines


def model_card(card: ModelCard, files: list[str]) -> str:
    """The README.md text; `files`: the sentence-transformers module folders, in order."""
    name = card.name or pathlib.Path(card.source).name
    lines = [
        "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, sentence-similarity, gembed]", "---", "",
        f"# {name}", "",
        "A text and code embedding model trained with gembed (JAX), exported to the "
        "sentence-transformers layout. sentence-transformers, transformers (with the pooling "
        "below) and gembed compute the same vectors (cosine >= 0.99999 in gembed's conformance "
        "tests).", "",
        "## Model", "", *_model_table(card), "",
        f"Modules: {' -> '.join(files)}.", "",
    ]
    if card.family.model_type in FAMILY_NOTES:
        lines += [FAMILY_NOTES[card.family.model_type], ""]
    if card.model.attention_mask == "bidirectional" and card.causal_flags:
        lines += ["## Attention", "", BIDIRECTIONAL_NOTE]
    lines += _training(card) + _evaluation(card) + _usage(card)
    return "\n".join(lines)
