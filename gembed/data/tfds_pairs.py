"""TFDS for training pairs: a builder that prepares JSONL once as ArrayRecord, and a random-access reader.

`prepare_tfds_pairs({"train": "pairs.jsonl"}, name="mypairs", data_dir=DIR)` writes
DIR/gembed_pairs/mypairs/1.0.0/ (ArrayRecord shards); `TRAIN_DATA='tfds:gembed_pairs/mypairs:train'`
with `TfdsOptions.data_dir = DIR` then trains from it without loading the corpus into memory.
Any other TFDS dataset prepared as ArrayRecord is read the same way; `TfdsOptions.feature_map`
names its features for the fields of an `Example`. TensorFlow is not needed (`tfds.data_source`).
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import gin
import tensorflow_datasets as tfds

from gembed.data.examples import Example
from gembed.data.jsonl import read_jsonl
from gembed.errors import GembedUserError

BUILDER_NAME = "gembed_pairs"


class GembedPairs(tfds.core.GeneratorBasedBuilder):
    """(query, positive, negatives, task) records from JSONL files, one file per split."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, jsonl_by_split: Mapping[str, str] | None = None, **kwargs):
        self._jsonl_by_split = dict(jsonl_by_split or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "query": tfds.features.Text(), "positive": tfds.features.Text(),
            "negatives": tfds.features.Sequence(tfds.features.Text()),
            "task": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(path)
                for split, path in self._jsonl_by_split.items()}

    def _generate_examples(self, path):
        for index, example in enumerate(read_jsonl(path)):
            yield index, {"query": example.query, "positive": example.positive,
                          "negatives": list(example.negatives), "task": example.task or ""}


def prepare_tfds_pairs(jsonl_by_split: Mapping[str, str | os.PathLike], name: str,
                       data_dir: str | os.PathLike) -> pathlib.Path:
    """Prepares `gembed_pairs/<name>` in `data_dir` from JSONL files; returns its folder."""
    builder = GembedPairs(jsonl_by_split={split: str(path) for split, path in jsonl_by_split.items()},
                          data_dir=str(data_dir), config=tfds.core.BuilderConfig(name=name))
    builder.download_and_prepare(file_format="array_record")
    return pathlib.Path(builder.data_dir)


@gin.configurable("TfdsOptions")
def tfds_options(data_dir: str | None = None,
                 feature_map: Mapping[str, str] | None = None) -> tuple[str | None, dict[str, str]]:
    """Where TFDS datasets live (None: TFDS's default) and which feature holds each field.

    feature_map maps Example fields (query, positive, negatives, task) to feature names; the
    default is the identity, as `GembedPairs` writes them. Bound in gin as TfdsOptions.
    """
    fields = {"query": "query", "positive": "positive", "negatives": "negatives", "task": "task"}
    return data_dir, {**fields, **dict(feature_map or {})}


class TfdsExamples(Sequence):
    """A TFDS split as a random-access sequence of Examples, decoded on access."""

    def __init__(self, spec: str):
        try:
            _, name, split = spec.split(":")
        except ValueError:
            raise GembedUserError(
                f"{spec!r}: TFDS sources are written tfds:NAME[/CONFIG]:SPLIT") from None
        data_dir, self._feature_map = tfds_options()
        self._spec = spec
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir,
                                            download=False)
        except Exception as error:  # TFDS raises many kinds for a missing or unprepared dataset
            raise GembedUserError(
                f"{spec}: cannot open this TFDS split from data_dir={data_dir or 'default'} "
                f"({str(error).splitlines()[0]}); prepare it (gembed.data.prepare_tfds_pairs) "
                f"or bind TfdsOptions.data_dir to where it was prepared.") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self._source[index]
        where = f"{self._spec} record {index}"

        def text(value, field):
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            if not text.strip():
                raise GembedUserError(f"{where}: {field} is empty; fix or filter the dataset")
            return text

        fields = self._feature_map
        try:
            negatives = record.get(fields["negatives"], [])
            task = record.get(fields["task"], b"")
            return Example(
                query=text(record[fields["query"]], "query"),
                positive=text(record[fields["positive"]], "positive"),
                negatives=tuple(text(n, "negative") for n in negatives),
                task=(task.decode("utf-8") if isinstance(task, bytes) else task) or None)
        except KeyError as error:
            raise GembedUserError(
                f"{where}: no feature {error.args[0]!r} (it has {sorted(record)}); bind "
                f"TfdsOptions.feature_map to name the query and positive features.") from None
