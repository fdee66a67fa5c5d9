"""`LanguageModel`: a Hugging Face decoder folder (Llama / Qwen / Gemma families, safetensors,
tokenizer.json) loaded as a causal LM, and the host side of `gembed.generation`: tokenizing, chat
formatting, batching and padding.

Params are the plain float32 pytree {"encoder": ..., "lm_head": {"kernel": [D, V]}} ("lm_head"
absent when the folder ties it to the token embedding), placed on one device, or on a mesh by
`gembed.sharding` rules over their "/"-joined names (`ShardingConfig.param_rules`, e.g.
experiments/configs/sharding/fsdp.gin), the rows of each batch then split over its "data" axis.

Calls sort their texts by token length and run them `batch_size` rows at a time, padded to a few
bucket lengths so few shapes compile; the batches, and so the results, depend only on the texts
of the call.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tokenizers

from gembed import generation, sharding
from gembed.chat_template import compile_chat_template, read_chat_template, render_user_turn
from gembed.convert.families import family_of
from gembed.convert.source import read_json, read_source
from gembed.convert.weight_table import import_encoder
from gembed.data.batching import bucket_length
from gembed.data.hf_tokenizer import TOKENIZER_JSON, read_special_tokens
from gembed.errors import GembedUserError
from gembed.model import ModelConfig

BUCKETS_PER_OCTAVE = 4
UNBOUNDED = 1 << 30   # bucket_length cap: lengths are checked against the model, not capped
TIED_BY_DEFAULT = {"llama": False, "qwen2": False, "gemma": True, "qwen3": False,   # transformers'
                   "gemma2": True, "gemma3_text": True}                            # config defaults


def resolve_llm_folder(spec: str) -> pathlib.Path:
    """The decoder folder `spec` names (a path; `hf:` names are not resolved here)."""
    if spec.startswith("hf:"):
        raise GembedUserError(
            f"--llm={spec}: this gembed does not resolve hf: names for the LLM yet; download the "
            f"model folder (config.json, *.safetensors, tokenizer.json) and pass --llm=FOLDER.")
    path = pathlib.Path(spec)
    if not path.is_dir():
        raise GembedUserError(f"--llm={spec}: not a folder; pass a Hugging Face decoder folder.")
    return path


def read_causal_lm(folder: pathlib.Path, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """(ModelConfig with the causal mask, float32 NumPy params with the LM head) of a folder."""
    source = read_source(folder)
    where = source.transformer_dir / "config.json"
    model_type = source.config.get("model_type")
    if model_type not in TIED_BY_DEFAULT:
        raise GembedUserError(f"{where}: model_type {model_type!r} is not a supported decoder "
                              f"({', '.join(TIED_BY_DEFAULT)}); pick one of those families.")
    family = family_of(model_type, where)
    tensors = family.source_tensors(source.weights)
    config = dataclasses.replace(family.model_config(
        source.config, tensors, attention="causal", pooling="last", where=where), dtype=dtype)
    params: dict[str, Any] = {
        "encoder": import_encoder(family, tensors, config, source.transformer_dir)}
    if not source.config.get("tie_word_embeddings", TIED_BY_DEFAULT[model_type]):
        head = source.weights.get("lm_head.weight")
        if head is None or head.shape != (config.vocab_size, config.hidden_size):
            raise GembedUserError(
                f"{source.transformer_dir}: lm_head.weight missing or not [vocab_size, hidden_size] "
                f"though config.json does not tie it to the embedding; re-download the model.")
        params["lm_head"] = {"kernel": np.ascontiguousarray(head.T)}
    return config, params


def _stop_ids(folder: pathlib.Path, tokenizer: tokenizers.Tokenizer,
              special: dict[str, str]) -> tuple[int, ...]:
    """The eos ids of generation_config.json (an id or a list) and of the tokenizer config."""
    ids = set()
    if (folder / "generation_config.json").is_file():
        eos = read_json(folder / "generation_config.json").get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if special.get("eos_token") is not None and tokenizer.token_to_id(special["eos_token"]) is not None:
        ids.add(tokenizer.token_to_id(special["eos_token"]))
    return tuple(sorted(ids))


def _pad_rows(rows: Sequence[Sequence[int]], batch_size: int, length: int, pad_id: int,
              side: str) -> tuple[np.ndarray, np.ndarray]:
    """int32[batch_size, length] ids and bool mask of `rows` padded on `side`; the rows past
    len(rows) hold one pad token (a real token, so no row is empty)."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for slot in range(batch_size):
        row = rows[slot] if slot < len(rows) else [pad_id]
        start = 0 if side == "right" else length - len(row)
        ids[slot, start:start + len(row)] = row
        mask[slot, start:start + len(row)] = True
    return ids, mask


@dataclasses.dataclass
class LanguageModel:
    """A causal LM ready for generation and scoring (see the module docstring).

    `chat_template`: the compiled template prompts are wrapped in (one user turn), or None to feed
    prompts as they are after the tokenizer's own special tokens (e.g. BOS).
    """

    config: ModelConfig
    params: Any
    tokenizer: tokenizers.Tokenizer
    stop_ids: tuple[int, ...]
    pad_id: int
    special_tokens: dict[str, str]
    chat_template: Any = None
    batch_size: int = 8
    source: str = ""   # where it was loaded from (recorded by curation runs)
    mesh: jax.sharding.Mesh | None = None   # the params' mesh; batch rows go over its "data" axis

    def _on_devices(self, *arrays: np.ndarray):
        """Host batch arrays, split by rows over the mesh's "data" axis when there is a mesh."""
        if self.mesh is None:
            return arrays
        return tuple(jax.device_put(a, sharding.batch_sharded(self.mesh)) for a in arrays)

    def settings(self) -> dict[str, Any]:
        """What decides this model's outputs besides its inputs (for records of runs)."""
        return {"llm": self.source, "dtype": self.config.dtype, "batch_size": self.batch_size,
                "chat_template": self.chat_template is not None, "stop_ids": list(self.stop_ids),
                "mesh": None if self.mesh is None else dict(self.mesh.shape)}

    # -- text <-> ids -----------------------------------------------------------------------

    def prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of prompts: chat-formatted (its own special tokens) or with the tokenizer's."""
        if self.chat_template is None:
            return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        formatted = [render_user_turn(self.chat_template, text, self.special_tokens) for text in texts]
        return [e.ids for e in self.tokenizer.encode_batch(formatted, add_special_tokens=False)]

    def text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of plain text (continuations, labels), without special tokens."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` with at most `max_tokens` tokens (cut at a token start)."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= max_tokens:
            return text
        return text[:encoding.offsets[max_tokens][0]].rstrip()

    # -- batched calls ----------------------------------------------------------------------

    def _batches(self, lengths: Sequence[int], extra_tokens: int = 0) -> list[np.ndarray]:
        """Row indices per batch, by increasing length; refuses rows the model cannot position."""
        longest = max(lengths, default=0) + extra_tokens
        if longest > self.config.max_position_embeddings:
            raise GembedUserError(
                f"{self.source}: a sequence of {longest} tokens exceeds the LLM's "
                f"max_position_embeddings={self.config.max_position_embeddings}; lower "
                f"--max_text_tokens (or --max_new_tokens) or shorten the prompt files.")
        order = np.argsort(np.asarray(lengths), kind="stable")
        return [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     sample_ids: Sequence[int] | None = None, padding: str = "left"
                     ) -> list[list[int]]:
        """Generated ids per prompt (token id lists), up to and including a stop token.

        Sampling draws prompt i's tokens from the key fold_in(PRNGKey(seed), sample_ids[i])
        (default i), so a prompt's sample depends on its id, not on its batch.
        """
        sample_ids = np.arange(len(prompts)) if sample_ids is None else np.asarray(sample_ids)
        base_key = jax.random.PRNGKey(seed)
        outputs: list[list[int]] = [[] for _ in prompts]
        for rows in self._batches([len(p) for p in prompts], max_new_tokens):
            length = bucket_length(max(len(prompts[i]) for i in rows), UNBOUNDED, BUCKETS_PER_OCTAVE)
            ids, mask = _pad_rows([prompts[i] for i in rows], self.batch_size, length,
                                  self.pad_id, padding)
            row_ids = np.zeros(self.batch_size, np.int32)
            row_ids[:len(rows)] = sample_ids[rows]
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, row_ids)
            ids, mask, keys = self._on_devices(ids, mask, np.asarray(keys))
            tokens, lengths = generation.generate(
                self.params, ids, mask, keys, config=self.config, max_new_tokens=max_new_tokens,
                temperature=float(temperature), top_p=float(top_p), stop_ids=self.stop_ids,
                pad_id=self.pad_id)
            tokens, lengths = np.asarray(tokens), np.asarray(lengths)
            for slot, i in enumerate(rows):
                outputs[i] = tokens[slot, :lengths[slot]].tolist()
        return outputs

    def generate(self, prompts: Sequence[str], **kwargs) -> list[str]:
        """The text each prompt is continued by (stop tokens dropped); kwargs: `generate_ids`."""
        outputs = self.generate_ids(self.prompt_ids(prompts), **kwargs)
        return [self.decode([t for t in ids if t not in self.stop_ids]) for ids in outputs]

    def continuation_log_probs_of_ids(self, prompts: Sequence[Sequence[int]],
                                      continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per pair, float32[len(continuation)]: log p of each continuation token given the prompt
        and the continuation tokens before it."""
        rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        outputs: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rows)
        for batch in self._batches([len(row) for row in rows]):
            length = bucket_length(max(len(rows[i]) for i in batch), UNBOUNDED, BUCKETS_PER_OCTAVE)
            slots = min(length - 1, bucket_length(max(len(continuations[i]) for i in batch),
                                                  UNBOUNDED, BUCKETS_PER_OCTAVE))
            ids, mask = self._on_devices(*_pad_rows([rows[i] for i in batch], self.batch_size,
                                                    length, self.pad_id, "left"))
            log_probs = np.asarray(generation.continuation_log_probs(
                self.params, ids, mask, config=self.config, continuation_slots=slots))
            for slot, i in enumerate(batch):
                outputs[i] = log_probs[slot, slots - len(continuations[i]):]
        return outputs

    def continuation_log_likelihoods(self, prompts: Sequence[str], continuations: Sequence[str]
                                     ) -> tuple[np.ndarray, np.ndarray]:
        """(sum, mean) float64[N] of log p(continuation tokens | prompt) over each continuation's
        tokens; the prompt is formatted as `prompt_ids` does, the continuation follows it."""
        continuation_ids = self.text_ids(continuations)
        for text, ids in zip(continuations, continuation_ids):
            if not ids:
                raise GembedUserError(f"continuation {text!r} has no tokens; drop empty texts.")
        log_probs = self.continuation_log_probs_of_ids(self.prompt_ids(prompts), continuation_ids)
        sums = np.array([np.sum(row, dtype=np.float64) for row in log_probs])
        return sums, sums / np.array([len(row) for row in log_probs])

    def next_token_log_probs(self, prompts: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        """float32[N, T]: log p(the token after the formatted prompt = token_ids[t])."""
        prompt_ids = self.prompt_ids(prompts)
        output = np.zeros((len(prompts), len(token_ids)), np.float32)
        candidates = np.asarray(token_ids, np.int32)
        for batch in self._batches([len(p) for p in prompt_ids]):
            length = bucket_length(max(len(prompt_ids[i]) for i in batch), UNBOUNDED,
                                   BUCKETS_PER_OCTAVE)
            ids, mask = self._on_devices(*_pad_rows([prompt_ids[i] for i in batch],
                                                    self.batch_size, length, self.pad_id, "left"))
            log_probs = generation.next_token_log_probs(self.params, ids, mask, candidates,
                                                        config=self.config)
            output[batch] = np.asarray(log_probs)[:len(batch)]
        return output


def load_language_model(spec: str, *, dtype: str = "float32", batch_size: int = 8,
                        use_chat_template: bool = True, mesh: jax.sharding.Mesh | None = None,
                        param_rules=()) -> LanguageModel:
    """The LanguageModel of a Hugging Face decoder folder.

    `dtype`: the compute dtype ('float32' | 'bfloat16'; params stay float32). `use_chat_template`:
    wrap prompts in the folder's chat template when it has one. With `mesh`, params are placed by
    `param_rules` (`ShardingConfig.param_rules`; none: replicated), else on the default device.
    """
    folder = resolve_llm_folder(spec)
    config, params = read_causal_lm(folder, dtype)
    if not (folder / TOKENIZER_JSON).is_file():
        raise GembedUserError(f"{folder / TOKENIZER_JSON}: missing; the LLM folder needs the "
                              f"model's tokenizer.json.")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
        raise GembedUserError(f"{folder / TOKENIZER_JSON}: unreadable ({str(e).splitlines()[0]}); "
                              f"re-download the model.") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    special = read_special_tokens(folder)
    stop_ids = _stop_ids(folder, tokenizer, special)
    pad = tokenizer.token_to_id(special["pad_token"]) if "pad_token" in special else None
    pad_id = pad if pad is not None else (stop_ids[0] if stop_ids else 0)
    template = read_chat_template(folder) if use_chat_template else None
    if mesh is not None:
        data_parallel = mesh.shape[sharding.DATA_AXIS]
        if batch_size % data_parallel:
            raise GembedUserError(f"--batch_size={batch_size} does not split over the mesh's "
                                  f"{data_parallel} data-parallel shards; use a multiple of "
                                  f"{data_parallel}.")
        params = sharding.put(params, sharding.tree_shardings(params, mesh, param_rules))
    else:
        params = jax.device_put(params)
    return LanguageModel(
        config=config, params=params, tokenizer=tokenizer, stop_ids=stop_ids, pad_id=pad_id,
        special_tokens=special,
        chat_template=None if template is None else compile_chat_template(template, folder),
        batch_size=batch_size, source=str(folder.resolve()), mesh=mesh)
