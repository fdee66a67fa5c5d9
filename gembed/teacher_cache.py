"""Teacher vectors computed once per corpus and cached on disk, keyed by text hash.

A cache folder holds `teacher.json` ({"teacher": name, "size": Dt}) and shards
`vectors-NNNNN.safetensors`, each with "keys" int32[N, 2] (`gembed.losses.contrastive.text_keys`
of the raw text) and "vectors" float32[N, Dt] (the teacher's L2-normalised `encode` of the text,
with its own tokenizer and max length). Shards are written whole (temp file + rename) every
`shard_texts` new texts, so an interrupted fill keeps what it finished and a re-run computes only
the missing texts; runs, seeds and soups sharing the folder share the vectors.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from gembed import checkpoint, model_folder, workdir
from gembed.convert import hub, hub_folder
from gembed.data.examples import Example
from gembed.embedder import Embedder
from gembed.errors import GembedUserError
from gembed.losses.contrastive import text_keys

META_FILE = "teacher.json"
SHARD_GLOB = "vectors-*.safetensors"


def _key_ints(keys: np.ndarray) -> np.ndarray:
    """int32[N, 2] text keys -> int64[N] (one number per text)."""
    return np.ascontiguousarray(keys.astype("<i4")).view("<i8").reshape(-1)


class TeacherVectors:
    """The vectors of a cache folder in memory: `lookup(texts)` -> f32[N, Dt] (zeros for "")."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        meta_path = self.folder / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise GembedUserError(f"{meta_path}: not a teacher-vector cache ({e}); fill it with "
                                  f"TrainConfig.teacher set, or use another folder.") from None
        self.teacher, self.size = meta["teacher"], int(meta["size"])
        keys, vectors = [np.zeros((0,), np.int64)], [np.zeros((0, self.size), np.float32)]
        for shard in sorted(self.folder.glob(SHARD_GLOB)):
            tensors = load_file(shard)
            keys.append(_key_ints(tensors["keys"]))
            vectors.append(tensors["vectors"])
        self._vectors = np.concatenate(vectors)
        self._row = {int(key): row for row, key in enumerate(np.concatenate(keys))}

    def __len__(self) -> int:
        return len(self._row)

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct non-empty texts of `texts` with no cached vector, in first-seen order."""
        unique = list(dict.fromkeys(text for text in texts if text))
        keys = _key_ints(text_keys(unique)) if unique else []
        return [text for text, key in zip(unique, keys) if int(key) not in self._row]

    def lookup(self, texts: Sequence[str]) -> np.ndarray:
        """f32[N, Dt]: the cached vector of each text; "" (a padding slot) gives zeros."""
        output = np.zeros((len(texts), self.size), np.float32)
        keys = _key_ints(text_keys(texts)) if len(texts) else []
        for index, (text, key) in enumerate(zip(texts, keys)):
            if not text:
                continue
            row = self._row.get(int(key))
            if row is None:
                raise GembedUserError(f"{self.folder}: no teacher vector for a training text "
                                      f"({text[:40]!r}...); set TrainConfig.teacher to fill it.")
            output[index] = self._vectors[row]
        return output


def fill_cache(folder: str | os.PathLike, teacher: str, encode: Callable[[list[str]], np.ndarray],
               texts: Sequence[str], shard_texts: int = 4096,
               log: Callable[[str], None] | None = None) -> TeacherVectors:
    """Computes and stores the teacher vectors of the `texts` not yet in `folder`; returns the
    whole cache. `encode(texts)` is the teacher (f32[N, Dt], L2-normalised rows)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META_FILE
    if meta_path.is_file():
        recorded = json.loads(meta_path.read_text())["teacher"]
        if recorded != teacher:
            raise GembedUserError(f"{meta_path}: holds vectors of teacher {recorded!r}, not "
                                  f"{teacher!r}; use another TrainConfig.teacher_cache folder.")
        missing = TeacherVectors(folder).missing(texts)
    else:
        missing = list(dict.fromkeys(text for text in texts if text))
    next_shard = len(list(folder.glob(SHARD_GLOB)))
    for start in range(0, len(missing), shard_texts):
        batch = missing[start:start + shard_texts]
        vectors = np.asarray(encode(batch), np.float32)
        if not meta_path.is_file():
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"teacher": teacher, "size": vectors.shape[1]}) + "\n")
            os.replace(tmp, meta_path)
        shard = folder / f"vectors-{next_shard:05d}.safetensors"
        tmp = shard.with_name(shard.name + ".tmp")
        save_file({"keys": text_keys(batch), "vectors": vectors}, str(tmp))
        os.replace(tmp, shard)
        next_shard += 1
        if log:
            log(f"gembed: teacher vectors {min(start + shard_texts, len(missing))}/{len(missing)} "
                f"new texts -> {folder}")
    return TeacherVectors(folder)


def load_model(name: str) -> Embedder:
    """The Embedder of a teacher (or of a recipe table's row): a model folder, an `hf:ORG/NAME`
    import, or a training CKPT."""
    path = str(hub_folder.hub_model_folder(name)) if hub.is_hub_name(name) else name
    if model_folder.is_model_folder(path):
        return Embedder.of(model_folder.read_model_folder(path))
    if checkpoint.holds_checkpoints(path):
        return Embedder.of(workdir.read_checkpoint_model(path))
    raise GembedUserError(f"{name}: neither a model folder, an hf: name nor a training checkpoint; "
                          f"fix TrainConfig.teacher (or Recipe.teacher).")


def example_texts(examples: Sequence[Example]) -> list[str]:
    """Every text of the examples (queries, positives, hard negatives), as the batches hold them."""
    return [text for example in examples
            for text in (example.query, example.positive, *example.negatives)]


def teacher_vectors(folder: str | os.PathLike, teacher: str | None, texts: Sequence[str],
                    max_length: int, batch_size: int = 64,
                    log: Callable[[str], None] | None = None) -> TeacherVectors:
    """The cache at `folder` holding every one of `texts`: filled by `teacher` where missing;
    without a teacher, the folder must already hold them all. The teacher reads at most
    `max_length` of its own tokens per text (at most its own max length), so it sees about what
    a student trained at that MAX_LENGTH sees; the cache records it with the teacher's name."""
    if teacher is None:
        cache = TeacherVectors(folder)
        missing = cache.missing(texts)
        if missing:
            raise GembedUserError(f"{folder}: {len(missing)} training texts have no teacher "
                                  f"vector; set TrainConfig.teacher to compute them.")
        return cache
    embedder = None

    def encode(batch: list[str]) -> np.ndarray:
        nonlocal embedder
        if embedder is None:
            embedder = load_model(teacher)
            embedder.max_length = min(embedder.max_length, max_length)
        return embedder.encode(batch, batch_size=batch_size)

    return fill_cache(folder, f"{teacher} max_length={max_length}", encode, texts, log=log)
