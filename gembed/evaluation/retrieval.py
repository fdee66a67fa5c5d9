"""BEIR-format retrieval: corpus.jsonl, queries.jsonl, qrels/<split>.tsv; nDCG@10 main (MTEB).

Documents are embedded as "title text" (stripped), as MTEB / sentence-transformers do; only the
queries that have judgements in the split are embedded. Exact search over the whole corpus.
"""
from __future__ import annotations

from typing import NamedTuple

from gembed.evaluation import metrics, search
from gembed.evaluation.context import EvalContext
from gembed.evaluation.data_files import data_path, malformed, read_csv, read_jsonl

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
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise malformed(queries_path, None, f"{len(missing)} judged queries missing (e.g. {missing[0]!r})")
    return RetrievalSet(doc_ids, doc_texts, queries, {q: qrels[q] for q in queries})


def evaluate(ctx: EvalContext, data: RetrievalSet) -> dict[str, float]:
    query_ids = list(data.queries)
    query_embeddings = ctx.encode([data.queries[q] for q in query_ids], task="retrieval")
    doc_embeddings = ctx.encode(data.doc_texts)
    _, top = search.top_k(query_embeddings, doc_embeddings, TOP_K)
    rankings = {q: [data.doc_ids[i] for i in row] for q, row in zip(query_ids, top)}
    return metrics.retrieval_scores(rankings, data.qrels)
