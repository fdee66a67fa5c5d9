"""Training mixtures: named datasets with sampling weights and task prompts (Gemini Embedding).

Each training batch is drawn from a single dataset; over many steps the share of steps of each
dataset follows its weight. Queries get the dataset's `query_prompt` prepended (e.g.
'task: code retrieval | query: '), documents its `document_prompt` (empty by default, as in the
paper; cpt-text-style side delimiters are the prompts '[' and '{').

In gin:
    TRAIN_DATA = None
    TrainConfig.datasets = [@code/DatasetSpec(), @docs/DatasetSpec()]
    code/DatasetSpec.name = 'code'
    code/DatasetSpec.data = 'builtin:stdlib_code'
    code/DatasetSpec.weight = 0.8
    code/DatasetSpec.query_prompt = 'task: code retrieval | query: '
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import gin

from gembed.data.examples import Example
from gembed.data.jsonl import SkippedLines
from gembed.data.sources import load_examples
from gembed.errors import GembedUserError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a mixture: where its examples are, its weight and its prompts."""

    name: str = ""
    data: str = ""                 # JSONL path, tfds:NAME[/CONFIG]:SPLIT, or builtin:NAME
    weight: float = 1.0            # relative share of training steps
    query_prompt: str = ""         # prepended to every query
    document_prompt: str = ""      # prepended to every positive and hard negative

    def __post_init__(self):
        if not self.name or not self.data:
            raise GembedUserError(
                f"DatasetSpec(name={self.name!r}, data={self.data!r}): both name and data are "
                f"required; bind NAME/DatasetSpec.name and .data in your gin file.")
        if not self.weight > 0:
            raise GembedUserError(
                f"DatasetSpec {self.name!r}: weight={self.weight} must be positive; fix the binding.")


@dataclasses.dataclass(frozen=True)
class TrainingDataset:
    """A DatasetSpec with its examples loaded (a random-access sequence)."""

    spec: DatasetSpec
    examples: Sequence[Example]


def load_datasets(specs: Sequence[DatasetSpec], split: str, *, max_text_chars: int | None,
                  skipped: SkippedLines | None) -> list[TrainingDataset]:
    """Loads every dataset of a mixture; names must be unique."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise GembedUserError(f"TrainConfig.datasets names {names} repeat; give each a unique name.")
    return [TrainingDataset(spec, load_examples(spec.data, split, max_text_chars=max_text_chars,
                                                skipped=skipped))
            for spec in specs]
