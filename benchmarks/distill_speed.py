"""Encode speed of a student against its teacher, interleaved so that both see the same load.

Both encode the first 256 stdlib_code test texts (queries, then functions) cut to 128 tokens, in
calls of 64 texts (`gembed.encode_speed`); rounds alternate teacher, student; each model's best
round counts. Prints one JSON line:
  python benchmarks/distill_speed.py TEACHER STUDENT [ROUNDS]
"""
from __future__ import annotations

import json
import sys

from gembed.data.builtin import load_builtin
from gembed.encode_speed import sentences_per_second
from gembed.teacher_cache import load_model

TEXTS, MAX_LENGTH, BATCH_SIZE = 256, 128, 64


def main(teacher: str, student: str, rounds: int = 3) -> None:
    examples = load_builtin("stdlib_code", "test")
    texts = ([e.query for e in examples] + [e.positive for e in examples])[:TEXTS]
    models = {"teacher": load_model(teacher), "student": load_model(student)}
    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = max(best[name], sentences_per_second(model, texts, MAX_LENGTH,
                                                               BATCH_SIZE, repeats=1))
    print(json.dumps({**{f"{k}_sentences_per_s": round(v, 1) for k, v in best.items()},
                      "speedup": round(best["student"] / best["teacher"], 2)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:4]))
