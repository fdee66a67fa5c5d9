"""The `gembed` command: the only place that parses flags. One function per sub-command.

Exit status: 0 success; 2 a user error, reported as one `gembed: error: ...` line on stderr;
1 anything else (a bug: the traceback is kept).
"""
from __future__ import annotations

import argparse
import errno
import os
import pathlib
import sys
from typing import Sequence

from gembed import compilation_cache, preemption, xla_cpu_flags
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
        compilation_cache.disable_for_cpu_collectives()
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)


def cmd_train(args: argparse.Namespace) -> None:
    if args.topology and not args.compile_only:
        raise GembedUserError("--topology applies to --compile_only; add it, or drop --topology.")
    if args.workdir is None and not args.compile_only:
        raise GembedUserError("train needs --workdir=DIR (or --compile_only).")
    from gembed import config, train

    if args.compile_only:
        import json

        from gembed import compile_plan

        config.parse_gin(args.gin_file, args.gin_param)
        plan, _ = compile_plan.compile_plan(config.build_stage_config(), args.topology)
        print(json.dumps(plan), flush=True)
        compile_plan.check_fits(plan, args.gin_file)
        return
    _initialize_distributed(args)
    config.parse_gin(args.gin_file, args.gin_param)
    train.train(args.workdir, config.build_stage_config())


def cmd_eval(args: argparse.Namespace) -> None:
    from gembed.evaluation import tasks

    selected = tasks.parse_task_list(args.tasks)   # a typo in --tasks fails before the model loads
    if args.batch_size < 1:
        raise GembedUserError(f"--batch_size={args.batch_size}: give a positive number of texts.")
    if args.model == "bm25":
        from gembed.evaluation.bm25 import BM25

        if args.dim is not None:
            raise GembedUserError("--dim applies to embedding models, not to --model=bm25; drop it.")
        encoder = BM25()
    else:
        from gembed import load   # gembed.load(MODEL_DIR) -> Embedder (model folder reader)

        encoder = load(args.model)
        _check_eval_dim(args, encoder)
    skipped, failed = {}, {}
    results = tasks.evaluate(encoder, [task.name for task in selected], data_dir=args.data_dir,
                             batch_size=args.batch_size, dim=args.dim, skipped=skipped, failed=failed)
    if results:
        print(tasks.format_table(results))
        if args.output:
            tasks.write_json(results, args.output)
    if failed:
        raise GembedUserError(f"{len(failed)} task(s) failed: " + "; ".join(
            f"{name}: {reason}" for name, reason in failed.items()))
    if not results:
        first, reason = next(iter(skipped.items()))
        raise GembedUserError(f"no task ran: all {len(skipped)} skipped (first, {first}: {reason}); "
                              f"check --data_dir and --tasks.")


def _check_eval_dim(args: argparse.Namespace, encoder) -> None:
    """`--dim` must be a prefix size the model has (1..its embedding size)."""
    size = getattr(encoder, "embedding_size", None)
    if args.dim is None or size is None:
        return
    if not 0 < args.dim <= size:
        trained = getattr(getattr(encoder, "model_config", None), "output_sizes", None)
        sizes = f" (trained Matryoshka sizes: {', '.join(map(str, trained))})" if trained else ""
        raise GembedUserError(f"--dim={args.dim}: {args.model} embeds into {size} dims{sizes}; "
                              f"pick 1..{size}.")


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
        embedder, examples, num_negatives=args.num_negatives, range_min=args.range_min,
        range_max=args.range_max, sampling=args.sampling, relative_margin=_margin(args.relative_margin),
        absolute_margin=_margin(args.absolute_margin), seed=args.seed, task=args.task,
        batch_size=args.batch_size, show_progress=sys.stderr.isatty())
    write_jsonl(args.output, mined)
    print(f"gembed: wrote {len(mined)} examples with {stats.negatives} negatives to {args.output}; "
          f"left out {stats.dropped_positive} positives, {stats.skipped_above_window} neighbours "
          f"above rank {args.range_min} and {stats.dropped_by_margin} candidates within a margin; "
          f"{stats.queries_short_of_negatives} examples got fewer than {args.num_negatives}")


def _margin(value: str) -> float | None:
    """A margin flag: a number, or `none` (off)."""
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise GembedUserError(f"margin {value!r}: give a number or none.") from None


def cmd_soup(args: argparse.Namespace) -> None:
    from gembed.soup import make_soup

    record = make_soup(args.checkpoints, args.output, method=args.method, eval_task=args.eval_task,
                       max_length=args.max_length, data_dir=args.data_dir,
                       batch_size=args.batch_size, overwrite=args.overwrite)
    score = f"; {args.eval_task} {record['score']:.2f}" if record["score"] is not None else ""
    print(f"gembed: wrote {args.method} soup of {len(record['kept'])}/{len(record['ingredients'])} "
          f"checkpoints to {args.output}{score}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "sentence-transformers":
        from gembed.convert.exporter import export_sentence_transformers

        if args.dtype != "float32":
            raise GembedUserError(f"--dtype={args.dtype} applies to --format=gembed only; "
                                  f"sentence-transformers folders are float32.")
        if args.overwrite:
            raise GembedUserError("--overwrite applies to --format=gembed only; remove the "
                                  "sentence-transformers output folder first.")
        path = export_sentence_transformers(args.checkpoint, args.output,
                                            max_length=args.max_length,
                                            eval_results=args.eval_results)
        print(f"gembed: wrote sentence-transformers folder {path}")
        return
    from gembed.export import export

    path = export(args.checkpoint, args.output, max_length=args.max_length,
                  weights_dtype=args.dtype, overwrite=args.overwrite)
    print(f"gembed: wrote model folder {path}")


def cmd_encode(args: argparse.Namespace) -> None:
    import numpy as np

    from gembed.text_input import read_texts

    if args.batch_size < 1:
        raise GembedUserError(f"--batch_size={args.batch_size}: give a positive number of texts.")
    output = _encode_output(args.output)
    texts = read_texts(args.input)
    from gembed import load

    model = load(args.model)
    if args.dim is not None and not 0 < args.dim <= model.embedding_size:
        raise GembedUserError(f"--dim={args.dim}: {args.model} embeds into "
                              f"{model.embedding_size} dims; pick 1..{model.embedding_size}.")
    if args.task is not None and args.task not in model.task_prompts:
        known = ", ".join(sorted(model.task_prompts)) or "none"
        raise GembedUserError(f"--task={args.task}: {args.model} has no prompt for it (its "
                              f"tasks: {known}); pick one of those or drop --task.")
    embeddings = model.encode(texts, task=args.task, dim=args.dim, batch_size=args.batch_size,
                              show_progress=sys.stderr.isatty())
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as file:
        np.save(file, embeddings.astype(np.float32))
    os.replace(tmp, output)
    print(f"gembed: wrote {embeddings.shape[0]} x {embeddings.shape[1]} float32 to {output}")


def _encode_output(output: str) -> pathlib.Path:
    """The .npy path `--output` names (`.npy` appended unless given), checked writable before any
    encoding."""
    path = pathlib.Path(output if output.endswith(".npy") else output + ".npy")
    if path.is_dir():
        raise GembedUserError(f"{path}: --output is a folder; name a .npy file.")
    if not path.parent.is_dir():
        raise GembedUserError(f"{path.parent}: --output's folder does not exist; create it first.")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GembedUserError(f"{path}: --output is not writable (permission denied); pick "
                              f"another path.")
    return path


def cmd_curate_plan(args: argparse.Namespace) -> None:
    import json

    from gembed import config, sharding
    from gembed.curate.scoring_plan import check_fits, scoring_plan

    config.parse_gin(args.gin_file, args.gin_param)
    layout = sharding.ShardingConfig()
    plan = scoring_plan(args.llm, batch_size=args.batch_size, max_text_tokens=args.max_text_tokens,
                        dtype=args.dtype, topology=args.topology,
                        model_parallelism=layout.model_parallelism, param_rules=layout.param_rules)
    print(json.dumps(plan), flush=True)
    check_fits(plan)


def cmd_curate(args: argparse.Namespace) -> None:
    from gembed import curate
    from gembed.curate.progress import sidecar_paths
    from gembed.data import load_examples
    from gembed.text_input import read_texts

    prompts = curate.load_prompts(args.prompts)   # typos in inputs fail before the LLM loads
    if args.stage == "synthesize" and args.input.endswith(".txt"):
        examples, passages = (), read_texts(args.input)
    else:
        examples = load_examples(args.input, split=args.split)
        passages = list(dict.fromkeys(e.positive for e in examples))
    import gembed
    from gembed import config, sharding
    from gembed.llm import load_language_model

    embedder = gembed.load(args.model) if args.stage == "negatives" else None

    config.parse_gin(args.gin_file, args.gin_param)
    layout = sharding.ShardingConfig()
    llm = load_language_model(args.llm, dtype=args.dtype, batch_size=args.batch_size,
                              use_chat_template=not args.no_chat_template,
                              mesh=sharding.make_mesh(layout.model_parallelism),
                              param_rules=layout.param_rules)
    common = dict(prompts=prompts, grades=args.grades.split(","), chunk_size=args.chunk_size,
                  max_text_tokens=args.max_text_tokens, show_progress=sys.stderr.isatty())
    if args.stage == "synthesize":
        shots = load_examples(args.shots, split=args.split) if args.shots else examples
        counts = curate.synthesize(
            llm, passages, args.output, shots=shots, num_shots=args.num_shots,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, min_score=args.min_score, task=args.task, **common)
    elif args.stage == "filter":
        counts = curate.filter_pairs(llm, examples, args.output, min_score=args.min_score, **common)
    else:
        counts = curate.llm_negatives(
            llm, embedder, examples, args.output, num_candidates=args.candidates,
            num_negatives=args.num_negatives, rrf_k=args.rrf_k, task=args.task,
            embed_batch_size=args.batch_size, **common)
    summary = ", ".join(f"{name} {value}" for name, value in counts.items())
    print(f"gembed: curate {args.stage} wrote {args.output} ({summary}); per-example scores in "
          f"{sidecar_paths(pathlib.Path(args.output))[0]}")


def cmd_run(args: argparse.Namespace) -> None:
    from gembed.recipe import run_recipe

    print(run_recipe(args.gin_file, args.gin_param, args.workdir))


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="run (or resume) one training stage")
    train.add_argument("--gin_file", action="append", required=True, default=[],
                       help="gin file; a path or relative to experiments/configs (repeatable)")
    train.add_argument("--gin_param", action="append", default=[],
                       help="a gin binding NAME=VALUE, applied after the files (repeatable)")
    train.add_argument("--workdir", help="where checkpoints, logs and config go (required "
                                          "unless --compile_only)")
    train.add_argument("--compile_only", action="store_true",
                       help="compile the train step, print its plan (devices, memory per device "
                            "against HBM, FLOPs, attention kernel) as one JSON line, train nothing; "
                            "exit 2 when it exceeds the chip's memory")
    train.add_argument("--topology",
                       help="with --compile_only: compile for this TPU topology (v5e:2x2, "
                            "v5p:2x2x1, v6e:2x2, ...) instead of the local devices (aot extra)")
    train.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-host)")
    train.add_argument("--num_processes", type=int, help="number of processes (multi-host)")
    train.add_argument("--process_id", type=int, help="this process's index (multi-host)")
    train.set_defaults(run=cmd_train)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="score a model folder on evaluation tasks",
        description="Prints a table and writes JSON {task: {main_score, metric: value, ...}}, "
                    "scores x100. A task whose data set is absent is skipped with one line on stderr "
                    "and left out of the JSON; exit 2 when no task ran or a score is not finite.")
    evaluate.add_argument("--model", required=True,
                          help="a model folder (gembed export / import), or `bm25` for the lexical "
                               "BM25 baseline (retrieval and code-search tasks only; a folder "
                               "named bm25 is ./bm25)")
    evaluate.add_argument("--tasks", required=True,
                          help="comma-separated task names, e.g. stsb,scifact,stdlib_code,"
                               "stdlib_code:validation,tatoeba:deu,pairs:FILE.jsonl")
    evaluate.add_argument("--data_dir", help="folder holding the public evaluation sets")
    evaluate.add_argument("--output", help="where to write the results JSON")
    evaluate.add_argument("--batch_size", type=int, default=64, help="texts per encoder call")
    evaluate.add_argument("--dim", type=int, help="evaluate the first DIM coordinates (Matryoshka)")
    evaluate.set_defaults(run=cmd_eval)


def _add_import(commands) -> None:
    convert = commands.add_parser("import", help="convert a Hugging Face / sentence-transformers "
                                  "folder (safetensors) to a model folder")
    convert.add_argument("--source", required=True,
                         help="the source model folder, or hf:ORG/NAME[@REVISION] (Hugging Face "
                              "cache, an installed weights package, or a download)")
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
        description="Embeds the queries and the pool of positives with a first-round model, ranks "
                    "the pool for each query without its own positives, takes ranks RANGE_MIN.."
                    "RANGE_MAX-1, drops candidates within a margin of the positive's score, keeps "
                    "NUM_NEGATIVES of the rest (the nearest, or a seeded random draw), and writes "
                    "JSONL with `negatives` for the finetune stage. The defaults are NV-Retriever's "
                    "TopK-PercPos 95% (and gembed's earlier behaviour).")
    mine.add_argument("--model", required=True, help="a model folder or a training CKPT")
    mine.add_argument("--input", required=True, help="training pairs: JSONL, tfds:..., builtin:NAME")
    mine.add_argument("--split", default="train",
                      help="split of a built-in corpus: train, validation or test")
    mine.add_argument("--output", required=True, help="the JSONL to write")
    mine.add_argument("--num_negatives", type=int, default=4, help="negatives per example, at most")
    mine.add_argument("--range_min", type=int, default=0,
                      help="skip the nearest RANGE_MIN documents (likely false negatives); 0: none")
    mine.add_argument("--range_max", type=int, default=30,
                      help="take negatives from ranks below this (0 = the nearest non-positive)")
    mine.add_argument("--sampling", choices=("top", "random"), default="top",
                      help="top: the nearest candidates that survive the margins; random: a "
                           "uniform draw of them (seeded by --seed)")
    mine.add_argument("--relative_margin", default="0.95",
                      help="drop candidates scoring >= this x the positive's score; none: off")
    mine.add_argument("--absolute_margin", default="none",
                      help="drop candidates scoring >= the positive's score minus this; none: off")
    mine.add_argument("--seed", type=int, default=0, help="seed of --sampling=random")
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
    soup.add_argument("--max_length", type=int,
                      help="tokens per text for --eval_task (default: the MAX_LENGTH trained with)")
    soup.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --output (written aside, then swapped in)")
    soup.set_defaults(run=cmd_soup)


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="write a model folder from a checkpoint")
    export.add_argument("--checkpoint", required=True,
                        help="a training workdir (latest step), a step folder, or a soup (with "
                             "--format=sentence-transformers also a model folder)")
    export.add_argument("--format", choices=("gembed", "sentence-transformers"), default="gembed",
                        help="a gembed model folder, or a folder that sentence-transformers, "
                             "transformers and text-embeddings-inference load")
    export.add_argument("--eval_results",
                        help="sentence-transformers format: a `gembed eval --output` JSON whose "
                             "scores the model card shows")
    export.add_argument("--output", required=True, help="the model folder to write")
    export.add_argument("--max_length", type=int,
                        help="tokens per text (default: the MAX_LENGTH the run trained with)")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights dtype in model.safetensors (read back as float32)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output (written aside, then swapped in)")
    export.set_defaults(run=cmd_export)


def _add_encode(commands) -> None:
    encode = commands.add_parser("encode", help="embed the texts of a file into a .npy")
    encode.add_argument("--model", required=True, help="a model folder")
    encode.add_argument("--input", required=True,
                        help="one text per line, or a .jsonl file of objects with a \"text\" field")
    encode.add_argument("--output", required=True,
                        help="the .npy to write: float32 [N, dim] (.npy appended if missing)")
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


def _add_curate(commands) -> None:
    curate = commands.add_parser(
        "curate", help="LLM data curation: synthetic queries, pair filtering, LLM-judged negatives",
        description="Each stage reads training data and writes training JSONL, OUT.scores.jsonl "
                    "(the LLM's scores per input example) and OUT.progress.json; rerun the same "
                    "command to resume a killed run. Prompts: experiments/curate/prompts/.")
    stages = curate.add_subparsers(dest="stage", required=True, parser_class=_Parser)
    helps = {"synthesize": "synthetic queries for passages, rated by the LLM",
             "filter": "drop (query, positive) pairs the LLM grades irrelevant",
             "negatives": "hard negatives: a first model's neighbours the LLM judges irrelevant"}
    plan = stages.add_parser("plan", help="compile the LLM judge's scoring call from the "
                                          "decoder's config.json alone and print its memory plan")
    plan.add_argument("--llm", required=True, help="a decoder folder with config.json (weights "
                                                   "not needed)")
    plan.add_argument("--topology", help="compile for this TPU topology (e.g. v5e:2x2; the aot "
                                         "extra) instead of the local devices")
    plan.add_argument("--batch_size", type=int, default=8, help="rows per LLM call")
    plan.add_argument("--max_text_tokens", type=int, default=256,
                      help="texts are cut to this many tokens inside prompts")
    plan.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                      help="LLM compute dtype")
    plan.add_argument("--gin_file", action="append", default=[],
                      help="gin file binding ShardingConfig, e.g. sharding/fsdp.gin")
    plan.add_argument("--gin_param", action="append", default=[],
                      help="a binding, e.g. ShardingConfig.model_parallelism=4")
    plan.set_defaults(run=cmd_curate_plan)
    for stage, text in helps.items():
        flags = stages.add_parser(stage, help=text)
        flags.add_argument("--llm", required=True,
                           help="a Hugging Face decoder folder (Llama/Qwen2/Gemma, safetensors)")
        flags.add_argument("--input", required=True,
                           help="training pairs: JSONL, tfds:..., builtin:NAME"
                                + ("; or a .txt of passages, one per line"
                                   if stage == "synthesize" else ""))
        flags.add_argument("--split", default="train", help="split of a built-in corpus")
        flags.add_argument("--output", required=True, help="the JSONL to write (or resume)")
        flags.add_argument("--prompts", help="a folder of prompt files overriding the defaults")
        flags.add_argument("--grades", default="0,1,2,3",
                           help="the relevance prompt's answer tokens, least relevant first")
        flags.add_argument("--max_text_tokens", type=int, default=256,
                           help="texts are cut to this many tokens inside prompts")
        flags.add_argument("--batch_size", type=int, default=8, help="rows per LLM call")
        flags.add_argument("--chunk_size", type=int, default=64,
                           help="input examples per committed chunk")
        flags.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                           help="LLM compute dtype (bfloat16 on TPU/GPU)")
        flags.add_argument("--no_chat_template", action="store_true",
                           help="feed prompts without the LLM folder's chat template")
        flags.add_argument("--gin_file", action="append", default=[],
                           help="gin file binding ShardingConfig, e.g. sharding/fsdp.gin to shard "
                                "the LLM's params over the devices (default: replicated)")
        flags.add_argument("--gin_param", action="append", default=[],
                           help="a binding, e.g. ShardingConfig.model_parallelism=4")
        if stage in ("synthesize", "filter"):
            flags.add_argument("--min_score", type=float, default=0.5,
                               help="keep pairs whose graded relevance (0..1) is at least this")
        if stage == "synthesize":
            flags.add_argument("--shots", help="pairs to draw demonstrations from "
                                               "(default: the input pairs)")
            flags.add_argument("--num_shots", type=int, default=3, help="demonstrations per prompt")
            flags.add_argument("--max_new_tokens", type=int, default=48, help="tokens per query")
            flags.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
            flags.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass")
            flags.add_argument("--seed", type=int, default=0)
            flags.add_argument("--task", help="the task name written on every example")
        if stage == "negatives":
            flags.add_argument("--model", required=True,
                               help="the first-round embedder: a model folder or a training CKPT")
            flags.add_argument("--task", help="the task whose prompt the embedder's queries get")
            flags.add_argument("--candidates", type=int, default=10,
                               help="nearest neighbours the LLM judges per query")
            flags.add_argument("--num_negatives", type=int, default=2,
                               help="negatives kept per query (1-3 help, more overfit)")
            flags.add_argument("--rrf_k", type=int, default=60, help="the RRF constant")
        flags.set_defaults(run=cmd_curate)


SUB_COMMANDS = (_add_train, _add_eval, _add_import, _add_mine, _add_soup, _add_export, _add_encode,
                _add_curate, _add_run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gembed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in SUB_COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    xla_cpu_flags.apply()
    xla_cpu_flags.pin_cpu_platform()
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
    except preemption.Preempted as e:
        print(f"gembed: {e}", file=sys.stderr)
        return preemption.EXIT_CODE
    except OSError as e:
        if e.errno not in INFRASTRUCTURE_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"gembed: error: {where}{e.strerror or e}; {INFRASTRUCTURE_ERRNOS[e.errno]}",
              file=sys.stderr)
        return 2
    return 0


# Faults of the machine, not of gembed: one `gembed: error:` line (naming the path), no traceback.
INFRASTRUCTURE_ERRNOS = {
    errno.ENOSPC: "free disk space (or write elsewhere) and rerun; a training run resumes.",
    errno.EDQUOT: "free space within your quota and rerun.",
    errno.EACCES: "fix the permissions of that path or pick another.",
    errno.EPERM: "fix the permissions of that path or pick another.",
    errno.EROFS: "the file system is read-only; write elsewhere.",
    errno.EIO: "the storage reported an I/O error; check the disk and rerun.",
}
