"""The `gembed` command: the only place that parses flags. One function per sub-command.

Exit status: 0 success; 2 a user error, reported as one `gembed: error: ...` line on stderr;
1 anything else (a bug: the traceback is kept).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from gembed import compilation_cache, xla_cpu_flags
from gembed.errors import GembedUserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `gembed: error:` line (exit 2), no usage dump."""

    def error(self, message: str):
        raise GembedUserError(f"{message}; see `{self.prog} --help`.")


def _initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed from the flags, or auto-detected on SLURM and TPU pods; single host otherwise."""
    import jax

    explicit = args.coordinator_address is not None
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not (explicit or slurm or xla_cpu_flags.tpu_chips_attached()):
        return
    if explicit and (args.num_processes is None or args.process_id is None):
        raise GembedUserError("--coordinator_address needs --num_processes and --process_id too.")
    if jax.config.jax_platforms in (None, "", "cpu") and explicit:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)


def cmd_train(args: argparse.Namespace) -> None:
    from gembed import config, train

    _initialize_distributed(args)
    config.parse_gin(args.gin_file, args.gin_param)
    train.train(args.workdir, config.build_stage_config())


def cmd_eval(args: argparse.Namespace) -> None:
    from gembed.evaluation import tasks

    selected = tasks.parse_task_list(args.tasks)   # a typo in --tasks fails before the model loads
    from gembed import load   # gembed.load(MODEL_DIR) -> Embedder (model folder reader)

    encoder = load(args.model)
    results = tasks.evaluate(encoder, [task.name for task in selected], data_dir=args.data_dir,
                             batch_size=args.batch_size, dim=args.dim)
    print(tasks.format_table(results))
    if args.output:
        tasks.write_json(results, args.output)


def cmd_import(args: argparse.Namespace) -> None:
    from gembed.convert.importer import import_model

    path = import_model(args.source, args.output, attention=args.attention, pooling=args.pooling,
                        projection_dim=args.projection_dim, max_length=args.max_length)
    print(f"gembed: wrote model folder {path}")


def cmd_mine(args: argparse.Namespace) -> None:
    import gembed
    from gembed.data import load_examples, write_jsonl
    from gembed.mining import mine_hard_negatives

    examples = load_examples(args.input, split=args.split)
    embedder = gembed.load(args.model)
    mined, stats = mine_hard_negatives(
        embedder, examples, num_negatives=args.num_negatives, candidates=args.candidates,
        relative_margin=args.relative_margin, task=args.task, batch_size=args.batch_size,
        show_progress=sys.stderr.isatty())
    write_jsonl(args.output, mined)
    print(f"gembed: wrote {len(mined)} examples with {stats.negatives} negatives to {args.output}; "
          f"dropped {stats.dropped_positive} positives and {stats.dropped_by_margin} candidates "
          f"within the margin; {stats.queries_short_of_negatives} queries got fewer than "
          f"{args.num_negatives}")


def cmd_soup(args: argparse.Namespace) -> None:
    from gembed.soup import make_soup

    record = make_soup(args.checkpoints, args.output, method=args.method, eval_task=args.eval_task,
                       data_dir=args.data_dir, batch_size=args.batch_size)
    score = f"; {args.eval_task} {record['score']:.2f}" if record["score"] is not None else ""
    print(f"gembed: wrote {args.method} soup of {len(record['kept'])}/{len(record['ingredients'])} "
          f"checkpoints to {args.output}{score}")


def cmd_export(args: argparse.Namespace) -> None:
    from gembed.export import export

    path = export(args.checkpoint, args.output, max_length=args.max_length,
                  weights_dtype=args.dtype)
    print(f"gembed: wrote model folder {path}")


def cmd_encode(args: argparse.Namespace) -> None:
    import numpy as np

    from gembed.text_input import read_texts

    texts = read_texts(args.input)
    from gembed import load

    model = load(args.model)
    if args.dim is not None and not 0 < args.dim <= model.embedding_size:
        raise GembedUserError(f"--dim={args.dim}: {args.model} embeds into "
                              f"{model.embedding_size} dims; pick 1..{model.embedding_size}.")
    embeddings = model.encode(texts, task=args.task, dim=args.dim, batch_size=args.batch_size,
                              show_progress=sys.stderr.isatty())
    np.save(args.output, embeddings.astype(np.float32))
    print(f"gembed: wrote {embeddings.shape[0]} x {embeddings.shape[1]} float32 to {args.output}")


def cmd_run(args: argparse.Namespace) -> None:
    from gembed.recipe import run_recipe

    print(run_recipe(args.gin_file, args.gin_param, args.workdir))


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="run (or resume) one training stage")
    train.add_argument("--gin_file", action="append", required=True, default=[],
                       help="gin file; a path or relative to experiments/configs (repeatable)")
    train.add_argument("--gin_param", action="append", default=[],
                       help="a gin binding NAME=VALUE, applied after the files (repeatable)")
    train.add_argument("--workdir", required=True, help="where checkpoints, logs and config go")
    train.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-host)")
    train.add_argument("--num_processes", type=int, help="number of processes (multi-host)")
    train.add_argument("--process_id", type=int, help="this process's index (multi-host)")
    train.set_defaults(run=cmd_train)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="score a model folder on evaluation tasks",
        description="Prints a table and writes JSON {task: {main_score, metric: value, ...}}, "
                    "scores x100. A task whose data set is absent is skipped with one line on stderr "
                    "and left out of the JSON.")
    evaluate.add_argument("--model", required=True, help="a model folder (gembed export / import)")
    evaluate.add_argument("--tasks", required=True,
                          help="comma-separated task names, e.g. stsb,scifact,stdlib_code,tatoeba:deu")
    evaluate.add_argument("--data_dir", help="folder holding the public evaluation sets")
    evaluate.add_argument("--output", help="where to write the results JSON")
    evaluate.add_argument("--batch_size", type=int, default=64, help="texts per encoder call")
    evaluate.add_argument("--dim", type=int, help="evaluate the first DIM coordinates (Matryoshka)")
    evaluate.set_defaults(run=cmd_eval)


def _add_import(commands) -> None:
    convert = commands.add_parser("import", help="convert a Hugging Face / sentence-transformers "
                                  "folder (safetensors) to a model folder")
    convert.add_argument("--source", required=True, help="the source model folder")
    convert.add_argument("--output", required=True, help="the model folder to write (new)")
    convert.add_argument("--attention", choices=("causal", "bidirectional"),
                         help="decoders: keep the causal mask (default) or remove it")
    convert.add_argument("--pooling", choices=("mean", "first", "last"),
                         help="default: the sentence-transformers Pooling module, else mean "
                              "(encoders) or last (decoders)")
    convert.add_argument("--projection_dim", type=int,
                         help="add a freshly initialised projection to this size")
    convert.add_argument("--max_length", type=int,
                         help="tokens per text (default: the source's max_seq_length, else 512)")
    convert.set_defaults(run=cmd_import)


def _add_mine(commands) -> None:
    mine = commands.add_parser(
        "mine", help="add mined hard negatives to training pairs",
        description="Embeds the queries and the pool of positives with a first-round model, takes "
                    "each query's nearest documents, drops its positive and any candidate scoring "
                    "at least RELATIVE_MARGIN x the positive's score, and writes JSONL with "
                    "`negatives` for the finetune stage.")
    mine.add_argument("--model", required=True, help="a model folder or a training CKPT")
    mine.add_argument("--input", required=True, help="training pairs: JSONL, tfds:..., builtin:NAME")
    mine.add_argument("--split", default="train", help="split of a built-in corpus")
    mine.add_argument("--output", required=True, help="the JSONL to write")
    mine.add_argument("--num_negatives", type=int, default=4, help="negatives per example, at most")
    mine.add_argument("--candidates", type=int, default=30, help="neighbours examined per query")
    mine.add_argument("--relative_margin", type=float, default=0.95,
                      help="drop candidates scoring >= this x the positive's score")
    mine.add_argument("--task", help="the task whose prompt queries get")
    mine.add_argument("--batch_size", type=int, default=64, help="texts per encoder call")
    mine.set_defaults(run=cmd_mine)


def _add_soup(commands) -> None:
    soup = commands.add_parser(
        "soup", help="average the params of checkpoints (model soup)",
        description="Uniform: the mean of every CKPT's params. Greedy: CKPTs sorted by their "
                    "--eval_task score, each added while the soup's score does not drop. Writes a "
                    "CKPT that train (INIT_FROM) and export accept, and DIR/soup.json.")
    soup.add_argument("checkpoints", nargs="+", metavar="CKPT",
                      help="a training workdir (latest step), a step folder, or a soup")
    soup.add_argument("--output", required=True, help="the soup folder to write (new)")
    soup.add_argument("--method", choices=("uniform", "greedy"), default="uniform")
    soup.add_argument("--eval_task", help="held-out task deciding the greedy soup (e.g. "
                      "stdlib_code:validation); with uniform, only scored")
    soup.add_argument("--data_dir", help="folder holding the public evaluation sets")
    soup.add_argument("--batch_size", type=int, default=64, help="texts per encoder call")
    soup.set_defaults(run=cmd_soup)


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="write a model folder from a checkpoint")
    export.add_argument("--checkpoint", required=True,
                        help="a training workdir (latest step), a step folder, or a soup")
    export.add_argument("--output", required=True, help="the model folder to write")
    export.add_argument("--max_length", type=int,
                        help="tokens per text (default: the MAX_LENGTH the run trained with)")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights dtype in model.safetensors (read back as float32)")
    export.set_defaults(run=cmd_export)


def _add_encode(commands) -> None:
    encode = commands.add_parser("encode", help="embed the texts of a file into a .npy")
    encode.add_argument("--model", required=True, help="a model folder")
    encode.add_argument("--input", required=True,
                        help="one text per line, or a .jsonl file of objects with a \"text\" field")
    encode.add_argument("--output", required=True, help="the .npy to write: float32 [N, dim]")
    encode.add_argument("--task", help="prepend this task's prompt (query side)")
    encode.add_argument("--dim", type=int, help="keep the first DIM coordinates (Matryoshka)")
    encode.add_argument("--batch_size", type=int, default=64, help="texts per encoder call")
    encode.set_defaults(run=cmd_encode)


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run", help="the whole recipe: pre-finetune, finetune runs, soups, export, eval",
        description="Runs the stages of a recipe gin file (a gembed.recipe.Recipe) in DIR/<stage>/, "
                    "skipping stages already complete, and prints the results table.")
    run.add_argument("--gin_file", required=True,
                     help="the recipe, e.g. experiments/recipes/quickstart.gin")
    run.add_argument("--gin_param", action="append", default=[],
                     help="a binding NAME=VALUE applied after the recipe (repeatable)")
    run.add_argument("--workdir", required=True, help="where every stage's folder goes")
    run.set_defaults(run=cmd_run)


SUB_COMMANDS = (_add_train, _add_eval, _add_import, _add_mine, _add_soup, _add_export, _add_encode,
                _add_run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gembed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in SUB_COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    xla_cpu_flags.apply()
    compilation_cache.enable()
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except GembedUserError as e:
        first_line = str(e).splitlines()[0]   # gin appends "In call to configurable ..." lines
        print(f"gembed: error: {first_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gembed: interrupted; checkpoints written so far are kept.", file=sys.stderr)
        return 130
    return 0
