"""Retrieval: BEIR-format sets (nDCG@10 main, as MTEB) and (query, positive) pairs (MRR@10 main).

BEIR: corpus.jsonl, queries.jsonl, qrels/<split>.tsv. Documents are embedded as "title text"
(stripped), as MTEB / sentence-transformers do; only the queries that have judgements in the split
are embedded. Exact search over the whole corpus (or BM25: see `gembed.evaluation.ranking`).

Pairs (`pairs:FILE.jsonl` in the training JSONL format, and the built-in `stdlib_docs`): each
distinct query is searched against the pool of distinct positives; its relevant documents are the
positives it is paired with (`negatives` are not used). The main score is MRR@10, not nDCG@10:
with one relevant document per query (the usual case) nDCG@10 only re-weights the same rank by
1/log2(rank + 1), while MRR@10 is the standard measure for single-answer search (MS MARCO,
CodeSearchNet) and the one code-search results here are compared in. nDCG@k and Recall@k are
reported too.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from gembed.data.examples import Example
from gembed.errors import GembedUserError
from gembed.evaluation import metrics, ranking
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import at_least, data_path, malformed, read_csv, read_jsonl

TOP_K = 100


class RetrievalSet(NamedTuple):
    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]                  # query id -> text, judged queries only
    qrels: dict[str, dict[str, int]]         # query id -> {doc id: relevance}


def load_beir(data_dir, folder: str, split: str = "test") -> RetrievalSet:
    qrels_path = data_path(data_dir, folder, "qrels", f"{split}.tsv")
    corpus_path = data_path(data_dir, folder, "corpus.jsonl")
    queries_path = data_path(data_dir, folder, "queries.jsonl")
    qrels: dict[str, dict[str, int]] = {}
    for number, row in enumerate(read_csv(qrels_path, delimiter="\t"), start=1):
        if number == 1 and row[:1] == ["query-id"]:
            continue
        if len(row) != 3:
            raise malformed(qrels_path, number, "expected query-id<TAB>corpus-id<TAB>score")
        try:
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
        except ValueError:
            raise malformed(qrels_path, number, f"score {row[2]!r} is not an integer") from None
    doc_ids, doc_texts = [], []
    for number, doc in read_jsonl(corpus_path):
        if "_id" not in doc:
            raise malformed(corpus_path, number, "document without \"_id\"")
        doc_ids.append(str(doc["_id"]))
        doc_texts.append(f"{doc.get('title') or ''} {doc.get('text') or ''}".strip())
    queries = {}
    for number, query in read_jsonl(queries_path):
        if "_id" not in query or "text" not in query:
            raise malformed(queries_path, number, "query without \"_id\" or \"text\"")
        if str(query["_id"]) in qrels:
            queries[str(query["_id"])] = query["text"]
    at_least(corpus_path, len(doc_ids), 2, "documents")
    at_least(qrels_path, len(queries), 1, "judged queries")
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise malformed(queries_path, None, f"{len(missing)} judged queries missing (e.g. {missing[0]!r})")
    return RetrievalSet(doc_ids, doc_texts, queries, {q: qrels[q] for q in queries})


def pairs_set(examples: Sequence[Example], source: str) -> RetrievalSet:
    """Distinct queries against the pool of distinct positives; `source` names the data in errors."""
    positive_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for example in examples:
        doc_id = positive_ids.setdefault(example.positive, f"d{len(positive_ids)}")
        query_id = query_ids.setdefault(example.query, f"q{len(query_ids)}")
        qrels.setdefault(query_id, {})[doc_id] = 1
    if len(positive_ids) < 2:
        raise GembedUserError(f"{source}: {len(positive_ids)} distinct positive; retrieval needs at "
                              f"least 2 (every other positive is a distractor), so add pairs.")
    return RetrievalSet(list(positive_ids.values()), list(positive_ids),
                        {query_id: query for query, query_id in query_ids.items()}, qrels)


def pairs_query_task(examples: Sequence[Example]) -> str:
    """The task whose prompt pairs' queries get: their common `task` field, else "retrieval"."""
    tasks = {example.task for example in examples}
    return tasks.pop() if len(tasks) == 1 and None not in tasks else "retrieval"


def evaluate_pairs(ctx: EvalContext, examples: Sequence[Example], source: str) -> dict[str, float]:
    """Retrieval scores of (query, positive) pairs; main score MRR@10."""
    scores = evaluate(ctx, pairs_set(examples, source), task=pairs_query_task(examples))
    return {**scores, "main_score": scores["mrr@10"]}


def evaluate(ctx: EvalContext, data: RetrievalSet, task: str = "retrieval") -> dict[str, float]:
    """nDCG@k, Recall@k and MRR@10 of the top TOP_K documents per query; `task` is the query
    side's task (prompt)."""
    query_ids = list(data.queries)
    top = ranking.ranker(ctx).top_k([data.queries[q] for q in query_ids], data.doc_texts, TOP_K,
                                    task=task)
    rankings = {q: [data.doc_ids[i] for i in row] for q, row in zip(query_ids, top)}
    return metrics.retrieval_scores(rankings, data.qrels)
