"""Linear-probe classification: logistic regression on frozen embeddings.

The classifier is MTEB's: scikit-learn `LogisticRegression(max_iter=100, random_state=42)` with its
defaults (L2, C=1, lbfgs). Splits follow each benchmark's published protocol:

- `banking77` (MTEB Banking77Classification): 10 experiments; each trains on `samples_per_label`
  (8) examples per class drawn from the train split by MTEB's sampler (one index list, reshuffled
  in place by `RandomState(42)` before each experiment) and tests on the whole test split; the
  metrics are averaged over the experiments. Main score: accuracy.
- SentEval tasks: MR, CR, SUBJ, MPQA by 10-fold stratified cross-validation (shuffled, seed 1111
  as SentEval); TREC (6 coarse classes), SST-2 and SST-5 on their fixed train/test splits.
  SentEval also tunes the L2 penalty on validation data; this probe does not (MTEB's fixed
  classifier), so scores sit slightly below SentEval's published ones. Main score: accuracy.
"""
from __future__ import annotations

import collections
from typing import NamedTuple, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from gembed.evaluation import metrics
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import at_least, data_path, malformed, read_csv, read_lines

MAX_ITER = 100
N_EXPERIMENTS = 10
SAMPLES_PER_LABEL = 8
SENTEVAL_FOLDS = 10
SENTEVAL_SEED = 1111


class Labelled(NamedTuple):
    texts: list[str]
    labels: list


class ClassificationSet(NamedTuple):
    train: Labelled
    test: Labelled | None      # None: cross-validate over `train`


def make_classifier(seed: int) -> LogisticRegression:
    return LogisticRegression(max_iter=MAX_ITER, random_state=seed)


def undersample(labels: Sequence, samples_per_label: int, order: list[int], seed: int) -> list[int]:
    """MTEB's `_undersample_data`: shuffles `order` in place with RandomState(seed), then keeps the
    first `samples_per_label` indices of each label in that order."""
    np.random.RandomState(seed).shuffle(order)
    counts: dict = collections.defaultdict(int)
    chosen = []
    for i in order:
        if counts[labels[i]] < samples_per_label:
            chosen.append(i)
            counts[labels[i]] += 1
    return chosen


def probe(train_x, train_y, test_x, test_y, seed: int) -> dict[str, float]:
    classifier = make_classifier(seed).fit(train_x, train_y)
    return metrics.classification_scores(test_y, classifier.predict(test_x))


def mean_scores(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}


def evaluate_mteb(ctx: EvalContext, data: ClassificationSet,
                  n_experiments: int = N_EXPERIMENTS,
                  samples_per_label: int = SAMPLES_PER_LABEL) -> dict[str, float]:
    """MTEB's subsampled-train protocol (see the module docstring)."""
    order = list(range(len(data.train.labels)))
    subsets = [undersample(data.train.labels, samples_per_label, order, ctx.seed)
               for _ in range(n_experiments)]
    needed = sorted(set().union(*subsets))
    embedded = dict(zip(needed, ctx.encode([data.train.texts[i] for i in needed], task="classification")))
    test_x = ctx.encode(data.test.texts, task="classification")
    runs = [probe(np.stack([embedded[i] for i in subset]), [data.train.labels[i] for i in subset],
                  test_x, data.test.labels, ctx.seed) for subset in subsets]
    return {"main_score": mean_scores(runs)["accuracy"], **mean_scores(runs)}


def evaluate_senteval(ctx: EvalContext, data: ClassificationSet) -> dict[str, float]:
    """Fixed train/test split, or 10-fold stratified cross-validation when there is no test split."""
    train_x = ctx.encode(data.train.texts, task="classification")
    train_y = np.asarray(data.train.labels)
    if data.test is not None:
        test_x = ctx.encode(data.test.texts, task="classification")
        scores = probe(train_x, train_y, test_x, np.asarray(data.test.labels), ctx.seed)
    else:
        folds = StratifiedKFold(SENTEVAL_FOLDS, shuffle=True, random_state=SENTEVAL_SEED)
        scores = mean_scores([probe(train_x[tr], train_y[tr], train_x[te], train_y[te], ctx.seed)
                              for tr, te in folds.split(train_x, train_y)])
    return {"main_score": scores["accuracy"], **scores}


def _checked(data: Labelled, path) -> Labelled:
    """`data` if it has two labelled rows of different classes (what a probe and k-means need)."""
    at_least(path, len(set(data.labels)), 2, "distinct labels")
    return data


def load_banking77(data_dir) -> ClassificationSet:
    def read(split):
        path = data_path(data_dir, "banking77", f"{split}.csv")
        rows = read_csv(path)
        if not rows or rows[0] != ["text", "category"]:
            raise malformed(path, 1, "expected the header text,category")
        for number, row in enumerate(rows[1:], start=2):
            if len(row) != 2:
                raise malformed(path, number, f"expected text,category, got {len(row)} fields")
        return _checked(Labelled([r[0] for r in rows[1:]], [r[1] for r in rows[1:]]), path)
    return ClassificationSet(read("train"), read("test"))


# SentEval's binary tasks: (folder, file with label 1, file with label 0).
SENTEVAL_BINARY = {"mr": ("MR", "rt-polarity.pos", "rt-polarity.neg"),
                   "cr": ("CR", "custrev.pos", "custrev.neg"),
                   "subj": ("SUBJ", "subj.subjective", "subj.objective"),
                   "mpqa": ("MPQA", "mpqa.pos", "mpqa.neg")}


def load_senteval_binary(data_dir, name: str) -> ClassificationSet:
    folder, positive, negative = SENTEVAL_BINARY[name]
    pos_path = data_path(data_dir, "senteval_cls", folder, positive)
    neg_path = data_path(data_dir, "senteval_cls", folder, negative)
    pos, neg = read_lines(pos_path), read_lines(neg_path)
    at_least(pos_path, len(pos), SENTEVAL_FOLDS, "lines (one per cross-validation fold)")
    at_least(neg_path, len(neg), SENTEVAL_FOLDS, "lines (one per cross-validation fold)")
    return ClassificationSet(Labelled(pos + neg, [1] * len(pos) + [0] * len(neg)), None)


def load_trec(data_dir) -> ClassificationSet:
    def read(file_name):
        path = data_path(data_dir, "senteval_cls", "TREC", file_name)
        texts, labels = [], []
        for number, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            label, _, text = line.partition(" ")
            if ":" not in label or not text:
                raise malformed(path, number, "expected 'COARSE:fine question'")
            texts.append(text.strip())
            labels.append(label.split(":")[0])
        return _checked(Labelled(texts, labels), path)
    return ClassificationSet(read("train_5500.label"), read("TREC_10.label"))


def load_sst(data_dir, classes: int) -> ClassificationSet:
    """SST-2: 'sentence<TAB>label'; SST-5: 'label sentence'."""
    folder = "Binary" if classes == 2 else "Fine-Grained"

    def read(split):
        path = data_path(data_dir, "senteval_cls", "SST", folder, f"sentiment-{split}")
        texts, labels = [], []
        for number, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            if classes == 2:
                text, _, label = line.rpartition("\t")
            else:
                label, _, text = line.partition(" ")
            if not label.strip().isdigit():
                raise malformed(path, number, f"label {label.strip()!r} is not an integer")
            texts.append(text.strip())
            labels.append(int(label))
        return _checked(Labelled(texts, labels), path)
    return ClassificationSet(read("train"), read("test"))
