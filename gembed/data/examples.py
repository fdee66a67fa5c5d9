"""The training example: a query, its positive passage, optional hard negatives and task."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Example:
    """One (query, positive) pair with optional hard negatives and a task name."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    task: str | None = None
