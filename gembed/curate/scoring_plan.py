"""`gembed curate plan`: the memory plan of the LLM judge's scoring call, from the
decoder's config.json alone (no weights needed), on the local devices or a named TPU topology.

The call planned is `gembed.generation.continuation_log_probs` (the query-likelihood prompt, the
longer of the two judge prompts: the graded-relevance prompt forms logits at one slot only) for
one batch of `batch_size` rows of `length` tokens, params in the compute dtype and placed by the
`ShardingConfig.param_rules` the curate command was given, rows split over the mesh's "data"
axis as `LanguageModel` splits them. A row holds the prompt template, a passage and a query of
up to `max_text_tokens` each: length = 2 * max_text_tokens + TEMPLATE_TOKENS. Memory is XLA's
plan per device (bytes), from `gembed.compile_plan.memory_plan`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp

from gembed import compile_plan, generation, sharding
from gembed.convert.families import family_of
from gembed.convert.source import read_json
from gembed.errors import GembedUserError
from gembed.llm import TIED_BY_DEFAULT
from gembed.model import ModelConfig
from gembed.model.encoder import Encoder

TEMPLATE_TOKENS = 64   # the judge prompt's own words and a chat template's markers


def decoder_config(folder: pathlib.Path, dtype: str) -> tuple[ModelConfig, bool]:
    """(the causal ModelConfig of `folder`/config.json, whether the LM head is tied)."""
    where = folder / "config.json"
    if not where.is_file():
        raise GembedUserError(f"{where}: missing; `gembed curate plan` needs the decoder's config.json.")
    config = read_json(where)
    model_type = config.get("model_type")
    if model_type not in TIED_BY_DEFAULT:
        raise GembedUserError(f"{where}: model_type {model_type!r} is not a supported decoder "
                              f"({', '.join(TIED_BY_DEFAULT)}); pick one of those families.")
    model = family_of(model_type, where).model_config(config, None, attention="causal",
                                                      pooling="last", where=where)
    tied = config.get("tie_word_embeddings", TIED_BY_DEFAULT[model_type])
    return dataclasses.replace(model, dtype=dtype), tied


def abstract_params(model: ModelConfig, tied: bool) -> dict:
    """ShapeDtypeStructs of the causal LM's params ({"encoder", "lm_head" unless tied}) in the
    compute dtype."""
    def init():
        encoder = Encoder(model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                                      jnp.ones((1, 8), bool))["params"]
        params = {"encoder": encoder}
        if not tied:
            params["lm_head"] = {"kernel": jnp.zeros((model.hidden_size, model.vocab_size))}
        return params
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, model.compute_dtype),
                        jax.eval_shape(init))


def check_fits(plan: dict) -> None:
    """Raises the user error of a scoring plan over its device's HBM."""
    if plan["fits"] is not False:
        return
    total, hbm = ((plan["memory_per_device_bytes"]["total"] or 0) / compile_plan.GIB,
                  (plan["device_memory_bytes"] or 0) / compile_plan.GIB)
    raise GembedUserError(
        f"{plan['llm']}: one scoring call plans {total:.1f} GiB per device but a "
        f"{plan['device_kind']} has {hbm:.1f} GiB; lower --batch_size or --max_text_tokens, shard "
        f"the LLM (--gin_file=sharding/fsdp.gin), or use more devices.")


def scoring_plan(folder: str | pathlib.Path, *, batch_size: int, max_text_tokens: int, dtype: str,
                 topology: str | None, model_parallelism: int, param_rules) -> dict:
    """The JSON-ready plan of one scoring call (see the module docstring)."""
    length = 2 * max_text_tokens + TEMPLATE_TOKENS
    model, tied = decoder_config(pathlib.Path(folder), dtype)
    devices = compile_plan.topology_devices(topology) if topology else jax.devices()
    mesh = sharding.make_mesh(model_parallelism, devices)
    if batch_size % mesh.shape[sharding.DATA_AXIS]:
        raise GembedUserError(f"--batch_size={batch_size} does not split over the mesh's "
                              f"{mesh.shape[sharding.DATA_AXIS]} data-parallel shards; use a "
                              f"multiple of it.")
    params = abstract_params(model, tied)
    params = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                          params, sharding.tree_shardings(params, mesh, param_rules))
    rows = sharding.batch_sharded(mesh)
    token_ids = jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch_size, length), jnp.bool_, sharding=rows)
    start = time.perf_counter()
    lowered = generation.continuation_log_probs.lower(
        params, token_ids, mask, config=model, continuation_slots=length // 2)
    _, planned, hbm, fits = compile_plan.memory_plan(lowered, devices[0])
    parameters = sum(leaf.size for leaf in jax.tree.leaves(params))
    return {
        "llm": str(folder), "parameters": parameters, "layers": model.num_layers,
        "devices": len(devices), "device_kind": devices[0].device_kind, "topology": topology,
        "mesh": dict(mesh.shape), "batch": [batch_size, length], "dtype": dtype,
        "memory_per_device_bytes": planned, "device_memory_bytes": hbm, "fits": fits,
        "compile_seconds": round(time.perf_counter() - start, 2),
    }
