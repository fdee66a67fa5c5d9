"""`Encoder` (tokens → hidden states) and `EmbeddingModel` (tokens → one vector per text).

Shapes: B batch, L sequence length, D hidden_size, E embedding_size. `mask` is bool[B, L],
True for real tokens; padding may be on the right (gembed's own batches) or the left: a row's real
tokens sit at positions 0, 1, ... by default, and 'last' pooling reads the last real token.

Packed rows (`gembed.data.packing`) hold several texts each: `segment_ids` int32[B, L] names the
text of every token (tokens attend only within their text) and `positions` int32[B, L] its
position in that text, so a packed text gets the hidden states it would get alone in a row.

Sliding-window (local) layers measure distance in token positions (`positions`), within one text
under right padding, left padding, packing and decoding alike.

Decoding passes `cache_index` (see `gembed.model.layers`): the L tokens fill cache slots
cache_index.. and attend causally over the cached slots, padding (mask False) never attended;
padding may then be on either side, with `positions` counting each row's real tokens.
"""
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from gembed.errors import GembedUserError
from gembed.sharding import constrain_rows
from gembed.model.attention import Visibility
from gembed.model.config import ModelConfig
from gembed.model.layers import (
    KERNEL_INIT,
    NARROW_MLP_HIDDEN,
    Norm,
    TransformerBlock,
    attention_mask,
    dense,
    sliding_window_mask,
)
from gembed.model.ordered_backward import call_in_order


def embed(config: ModelConfig, name: str, num_embeddings: int) -> nn.Embed:
    """A float32 lookup table [num_embeddings, D] read out in the compute dtype."""
    return nn.Embed(num_embeddings, config.hidden_size, dtype=config.compute_dtype,
                    param_dtype=jnp.float32, embedding_init=KERNEL_INIT, name=name)


class Encoder(nn.Module):
    """Embeddings, `num_layers` transformer blocks (layer_0, ...) and an optional final norm."""

    config: ModelConfig

    @nn.compact
    def __call__(self, token_ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 cache_index: jax.Array | None = None) -> jax.Array:
        """token_ids: int32[B, L]; mask: bool[B, L]; optional segment_ids, positions: int32[B, L]
        (default: one text per row, its real tokens at positions 0, 1, ...) → final hidden states
        float32[B, L, D].
        `cache_index` (int32 scalar): decode through the "cache" collection (module docstring)."""
        config = self.config
        length = token_ids.shape[1]
        if positions is None:   # a real token's index among its row's real tokens; padding: its
            positions = jnp.where(mask, jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1,   # index
                                  jnp.arange(length, dtype=jnp.int32)[None])
        x = embed(config, "token_embedding", config.vocab_size)(token_ids)
        if config.embedding_scale:
            x = x * jnp.asarray(math.sqrt(config.hidden_size), config.compute_dtype)
        if config.position_embedding == "learned":
            if length > config.max_position_embeddings:
                raise GembedUserError(
                    f"sequence length {length} exceeds ModelConfig.max_position_embeddings="
                    f"{config.max_position_embeddings}; truncate inputs to at most that many tokens.")
            x = x + embed(config, "position_embedding", config.max_position_embeddings)(positions)
        if config.type_vocab_size > 0:
            x = x + embed(config, "token_type_embedding", config.type_vocab_size)(
                jnp.zeros((1, 1), jnp.int32))
        if config.embedding_norm:
            x = Norm(config, name="embedding_norm")(x)
        if cache_index is None:
            visible, key_positions = attention_mask(mask, segment_ids), positions
        else:
            visible, key_positions = self._cached_visibility(mask, positions, cache_index)
        if config.local_layers:
            dense = visible.dense() if isinstance(visible, Visibility) else visible
            local_visible = dense & sliding_window_mask(positions, key_positions,
                                                        config.sliding_window)
        x = constrain_rows(x)
        for index in range(config.num_layers):
            local = index in config.local_layers
            layer_visible = local_visible if local else visible
            if cache_index is not None:
                x = TransformerBlock(config, local, name=f"layer_{index}")(
                    x, layer_visible, positions, deterministic, cache_index)
            else:
                block = remat_block(config.remat)(config, local, name=f"layer_{index}")
                if deterministic or config.dropout_rate == 0.0:
                    x = call_in_order(block, x, layer_visible, positions, deterministic)
                else:   # flax's dropout keys cannot cross call_in_order's custom_vjp in a scan
                    x = block(x, layer_visible, positions, deterministic)
            x = constrain_rows(x)
        if config.final_norm:
            x = Norm(config, name="final_norm")(x)
        return x.astype(jnp.float32)

    def _cached_visibility(self, mask: jax.Array, positions: jax.Array, cache_index: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
        """(bool[B, 1, L, S]: the real cache slots at or before each new token's slot, int32[B, S]:
        the slots' token positions), after recording the new tokens' mask bool[B, L] and
        positions int32[B or 1, L] in the cached slot mask and slot positions."""
        cached = self.variable("cache", "slot_mask", jnp.zeros, mask.shape, bool)
        cached.value = jax.lax.dynamic_update_slice_in_dim(cached.value, mask, cache_index, axis=1)
        slot_positions = self.variable("cache", "slot_position", jnp.zeros, mask.shape, jnp.int32)
        slot_positions.value = jax.lax.dynamic_update_slice_in_dim(
            slot_positions.value, jnp.broadcast_to(positions, mask.shape).astype(jnp.int32),
            cache_index, axis=1)
        query_slots = cache_index + jnp.arange(mask.shape[1])
        causal = jnp.arange(cached.value.shape[1])[None, :] <= query_slots[:, None]
        return cached.value[:, None, None, :] & causal[None, None], slot_positions.value


# What the backward pass keeps of each block's forward (the rest is recomputed): everything; the
# outputs of matmuls without batch dimensions (the dense layers: not the [B, N, L, L] attention
# scores) and, with bfloat16 matmul inputs, the MLP's bfloat16 hidden activation; only the
# block's inputs.
REMAT_POLICIES = {"none": None,
                  "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
                      jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                      jax.checkpoint_policies.save_only_these_names(NARROW_MLP_HIDDEN)),
                  "full": jax.checkpoint_policies.nothing_saveable}


def remat_block(policy: str) -> type[nn.Module]:
    """`TransformerBlock`, rematerialised per block under `ModelConfig.remat`'s policy."""
    if REMAT_POLICIES[policy] is None:
        return TransformerBlock
    return nn.remat(TransformerBlock, policy=REMAT_POLICIES[policy], static_argnums=(4,))


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """hidden: float32[B, L, D]; mask: bool[B, L] → float32[B, D].

    'mean': average over real tokens (zeros for a fully padded row); 'first' / 'last': the first /
    last real token, on either side of any padding (position 0 for a fully padded row).
    """
    hidden = hidden.astype(jnp.float32)
    if pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    if pooling == "first":
        return jnp.take_along_axis(hidden, jnp.argmax(mask, axis=1)[:, None, None], axis=1)[:, 0]
    length = mask.shape[1]
    last = jnp.where(jnp.any(mask, axis=1), length - 1 - jnp.argmax(mask[:, ::-1], axis=1), 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def pool_segments(hidden: jax.Array, mask: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                  num_texts: int, pooling: str) -> jax.Array:
    """`pool` of packed rows: hidden float32[B, L, D]; mask: bool[B, L]; segment_ids (text index
    in 0..num_texts-1), positions: int32[B, L] → float32[num_texts, D], zeros for an absent text."""
    hidden = hidden.astype(jnp.float32).reshape(-1, hidden.shape[-1])
    # padding weighs 0 (no extra "dropped" segment: a [num_texts + 1, D] sum whose slice XLA's TPU
    # compiler fails to reduce-scatter under FSDP)
    texts = jnp.where(mask, segment_ids, 0).reshape(-1)
    real = mask.reshape(-1).astype(jnp.float32)
    counts = jax.ops.segment_sum(real, texts, num_texts)
    positions = positions.reshape(-1)
    if pooling == "mean":
        weights = real
    elif pooling == "first":
        weights = real * (positions == 0)
    else:
        weights = real * (positions == counts[texts] - 1)
    pooled = jax.ops.segment_sum(hidden * weights[:, None], texts, num_texts)
    if pooling == "mean":
        pooled = pooled / jnp.maximum(counts[:num_texts, None], 1.0)
    return pooled


class EmbeddingModel(nn.Module):
    """`Encoder` + pooling + optional Dense projection; also owns the contrastive `log_scale`.

    `log_scale` (float32 scalar) is the learnable log inverse temperature, initialised to
    log(1 / initial_temperature); the loss reads it from the params, the forward pass does not.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, token_ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                 num_texts: int | None = None) -> jax.Array:
        """token_ids: int32[B, L]; mask: bool[B, L] → unnormalised embeddings float32[B, E].

        Packed rows (segment_ids, positions: int32[B, L], see the module docstring) give
        float32[num_texts, E], row t the embedding of the text whose segment id is t.
        """
        config = self.config
        self.param("log_scale", nn.initializers.constant(-math.log(config.initial_temperature)),
                   (), jnp.float32)
        hidden = Encoder(config, name="encoder")(token_ids, mask, deterministic=deterministic,
                                                 segment_ids=segment_ids, positions=positions)
        if segment_ids is None:
            pooled = pool(hidden, mask, config.pooling)
        else:
            pooled = pool_segments(hidden, mask, segment_ids, positions, num_texts, config.pooling)
        if config.projection_dim is not None:
            pooled = dense(config, config.projection_dim, config.projection_bias, "projection")(pooled)
        return pooled.astype(jnp.float32)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Fresh float32 params (the plain nested "params" dict) of `EmbeddingModel(config)`."""
    token_ids = jnp.zeros((1, 8), jnp.int32)
    mask = jnp.ones((1, 8), bool)
    return jax.jit(EmbeddingModel(config).init)(rng, token_ids, mask)["params"]
