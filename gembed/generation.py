"""Causal-LM inference with an imported decoder: logits, batched prefill and KV-cache decoding,
greedy or temperature / top-p sampling, and log-likelihood scoring. Pure jitted functions.

The decoder's params are {"encoder": the `Encoder` params, "lm_head": {"kernel": [D, V]}}; without
"lm_head" the token embedding is the output layer (tied embeddings).

Shapes: B batch, P prompt slots, C continuation slots, S cache slots, V vocabulary. Rows may be
padded on either side: `mask` marks real tokens, a row's tokens sit at RoPE positions 0, 1, ...
whatever its padding, and padded slots are never attended, so a prompt gives the same logits
alone, in a batch, left- or right-padded (up to float32 rounding).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gembed.model import Encoder, ModelConfig


def real_token_positions(mask: jax.Array) -> jax.Array:
    """int32[B, L]: the index of each real token among its row's real tokens (0 on padding)."""
    return jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)


def lm_logits(params: dict, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """hidden: float32[..., D] → next-token logits float32[..., V] (matmul in the compute dtype),
    soft-capped to (-c, c) by c = `final_logit_softcap` when set (Gemma 2)."""
    dtype = config.compute_dtype
    hidden = hidden.astype(dtype)
    if "lm_head" in params:
        logits = jnp.einsum("...d,dv->...v", hidden, params["lm_head"]["kernel"].astype(dtype),
                            preferred_element_type=jnp.float32)
    else:
        embedding = params["encoder"]["token_embedding"]["embedding"].astype(dtype)
        logits = jnp.einsum("...d,vd->...v", hidden, embedding, preferred_element_type=jnp.float32)
    if config.final_logit_softcap is not None:
        logits = config.final_logit_softcap * jnp.tanh(logits / config.final_logit_softcap)
    return logits


def init_cache(config: ModelConfig, batch: int, slots: int) -> dict:
    """The zeroed KV cache of `batch` rows and `slots` slots: per layer key and value
    [B, S, K, H] in the compute dtype, and the slot mask bool[B, S]."""
    def shapes():
        return Encoder(config).init(jax.random.PRNGKey(0), jnp.zeros((batch, slots), jnp.int32),
                                    jnp.zeros((batch, slots), bool),
                                    positions=jnp.zeros((batch, slots), jnp.int32),
                                    cache_index=jnp.int32(0))["cache"]
    return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), jax.eval_shape(shapes))


def _cached_forward(params, config, token_ids, mask, positions, cache, cache_index):
    """Hidden states float32[B, L, D] of L new tokens written at slot cache_index, and the cache."""
    hidden, variables = Encoder(config).apply(
        {"params": params["encoder"], "cache": cache}, token_ids, mask, positions=positions,
        cache_index=cache_index, mutable=["cache"])
    return hidden, variables["cache"]


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """logits float32[..., V] with -inf outside the nucleus: the most likely tokens whose
    probabilities, summed in decreasing order, first reach `top_p` (at least one token)."""
    descending = -jnp.sort(-logits, axis=-1)
    probabilities = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, row_keys: jax.Array, step: jax.Array, temperature: float,
                  top_p: float) -> jax.Array:
    """int32[B] next tokens from logits float32[B, V]: the argmax when temperature is 0, else a
    draw from softmax(logits / temperature) restricted to the top-p nucleus, with row b's key
    `fold_in(row_keys[b], step)` (row_keys: [B] PRNG keys), so a row's draws do not depend on
    the other rows of its batch."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        logits = top_p_filter(logits, top_p)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_p",
                                             "stop_ids", "pad_id"))
def generate(params: dict, token_ids: jax.Array, mask: jax.Array, row_keys: jax.Array, *,
             config: ModelConfig, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0
             ) -> tuple[jax.Array, jax.Array]:
    """Continues each prompt (token_ids int32[B, P], mask bool[B, P]; every row with at least one
    real token) by up to `max_new_tokens` tokens → (tokens int32[B, max_new_tokens], lengths
    int32[B]). A row stops after its first token in `stop_ids` (kept, counted in its length);
    `pad_id` fills the slots after. The loop ends early once every row has stopped.

    One prefill writes the prompts into a cache of P + max_new_tokens slots; each decoding step
    feeds the previous token of every row at the next slot. row_keys: [B] PRNG keys (sampling).
    """
    batch, prompt_slots = token_ids.shape
    stops = jnp.asarray(stop_ids, jnp.int32)
    is_stop = lambda tokens: jnp.any(tokens[:, None] == stops[None, :], axis=1)  # noqa: E731
    cache = init_cache(config, batch, prompt_slots + max_new_tokens)
    hidden, cache = _cached_forward(params, config, token_ids, mask,
                                    real_token_positions(mask), cache, jnp.int32(0))
    last_slot = jnp.max(jnp.where(mask, jnp.arange(prompt_slots), 0), axis=1)
    last_hidden = jnp.take_along_axis(hidden, last_slot[:, None, None], axis=1)[:, 0]
    token = sample_tokens(lm_logits(params, last_hidden, config), row_keys, jnp.int32(0),
                          temperature, top_p)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    state = (jnp.int32(1), tokens, cache, token, jnp.sum(mask, axis=1, dtype=jnp.int32),
             is_stop(token), jnp.ones(batch, jnp.int32))

    def keep_going(state):
        step, _, _, _, _, stopped, _ = state
        return (step < max_new_tokens) & ~jnp.all(stopped)

    def decode_step(state):
        step, tokens, cache, token, position, stopped, lengths = state
        hidden, cache = _cached_forward(params, config, token[:, None], jnp.ones((batch, 1), bool),
                                        position[:, None], cache, prompt_slots + step - 1)
        new = sample_tokens(lm_logits(params, hidden[:, 0], config), row_keys, step,
                            temperature, top_p)
        new = jnp.where(stopped, pad_id, new)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], step, axis=1)
        lengths = jnp.where(stopped, lengths, step + 1)
        return step + 1, tokens, cache, new, position + 1, stopped | is_stop(new), lengths

    _, tokens, _, _, _, _, lengths = jax.lax.while_loop(keep_going, decode_step, state)
    return tokens, lengths


def _hidden_states(params, config, token_ids, mask):
    return Encoder(config).apply({"params": params["encoder"]}, token_ids, mask,
                                 positions=real_token_positions(mask))


@functools.partial(jax.jit, static_argnames=("config", "continuation_slots"))
def continuation_log_probs(params: dict, token_ids: jax.Array, mask: jax.Array, *,
                           config: ModelConfig, continuation_slots: int) -> jax.Array:
    """float32[B, C]: log p(token | the tokens before it) of the last C = continuation_slots tokens
    of each row (token_ids int32[B, L], mask bool[B, L], left-padded so every row ends at slot
    L-1; C < L). Logits are formed for those C slots only."""
    hidden = _hidden_states(params, config, token_ids, mask)
    length = token_ids.shape[1]
    logits = lm_logits(params, hidden[:, length - continuation_slots - 1:length - 1], config)
    targets = token_ids[:, length - continuation_slots:]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("config",))
def next_token_log_probs(params: dict, token_ids: jax.Array, mask: jax.Array, candidates: jax.Array,
                         *, config: ModelConfig) -> jax.Array:
    """float32[B, T]: log p(next token = candidates[t] | row) for rows left-padded to end at slot
    L-1 (token_ids int32[B, L], mask bool[B, L]); candidates: int32[T]."""
    hidden = _hidden_states(params, config, token_ids, mask)
    log_probs = jax.nn.log_softmax(lm_logits(params, hidden[:, -1], config), axis=-1)
    return log_probs[:, candidates]
