"""`Encoder` (tokens → hidden states) and `EmbeddingModel` (tokens → one vector per text).

Shapes: B batch, L sequence length, D hidden_size, E embedding_size. `mask` is bool[B, L],
True for real tokens; padding is on the right.
"""
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from gembed.errors import GembedUserError
from gembed.model.config import ModelConfig
from gembed.model.layers import KERNEL_INIT, Norm, TransformerBlock, dense


def embed(config: ModelConfig, name: str, num_embeddings: int) -> nn.Embed:
    """A float32 lookup table [num_embeddings, D] read out in the compute dtype."""
    return nn.Embed(num_embeddings, config.hidden_size, dtype=config.compute_dtype,
                    param_dtype=jnp.float32, embedding_init=KERNEL_INIT, name=name)


class Encoder(nn.Module):
    """Embeddings, `num_layers` transformer blocks (layer_0, ...) and an optional final norm."""

    config: ModelConfig

    @nn.compact
    def __call__(self, token_ids: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """token_ids: int32[B, L]; mask: bool[B, L] → final hidden states float32[B, L, D]."""
        config = self.config
        length = token_ids.shape[1]
        x = embed(config, "token_embedding", config.vocab_size)(token_ids)
        if config.embedding_scale:
            x = x * jnp.asarray(math.sqrt(config.hidden_size), config.compute_dtype)
        if config.position_embedding == "learned":
            if length > config.max_position_embeddings:
                raise GembedUserError(
                    f"sequence length {length} exceeds ModelConfig.max_position_embeddings="
                    f"{config.max_position_embeddings}; truncate inputs to at most that many tokens.")
            x = x + embed(config, "position_embedding", config.max_position_embeddings)(
                jnp.arange(length))[None]
        if config.type_vocab_size > 0:
            x = x + embed(config, "token_type_embedding", config.type_vocab_size)(
                jnp.zeros((1, 1), jnp.int32))
        if config.embedding_norm:
            x = Norm(config, name="embedding_norm")(x)
        for index in range(config.num_layers):
            x = TransformerBlock(config, name=f"layer_{index}")(x, mask, deterministic=deterministic)
        if config.final_norm:
            x = Norm(config, name="final_norm")(x)
        return x.astype(jnp.float32)


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """hidden: float32[B, L, D]; mask: bool[B, L] → float32[B, D].

    'mean': average over real tokens (zeros for a fully padded row); 'first': position 0;
    'last': the last real token, position sum(mask) - 1 (position 0 for a fully padded row).
    """
    hidden = hidden.astype(jnp.float32)
    if pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    if pooling == "first":
        return hidden[:, 0]
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class EmbeddingModel(nn.Module):
    """`Encoder` + pooling + optional Dense projection; also owns the contrastive `log_scale`.

    `log_scale` (float32 scalar) is the learnable log inverse temperature, initialised to
    log(1 / initial_temperature); the loss reads it from the params, the forward pass does not.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, token_ids: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """token_ids: int32[B, L]; mask: bool[B, L] → unnormalised embeddings float32[B, E]."""
        config = self.config
        self.param("log_scale", nn.initializers.constant(-math.log(config.initial_temperature)),
                   (), jnp.float32)
        hidden = Encoder(config, name="encoder")(token_ids, mask, deterministic=deterministic)
        pooled = pool(hidden, mask, config.pooling)
        if config.projection_dim is not None:
            pooled = dense(config, config.projection_dim, config.projection_bias, "projection")(pooled)
        return pooled.astype(jnp.float32)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Fresh float32 params (the plain nested "params" dict) of `EmbeddingModel(config)`."""
    token_ids = jnp.zeros((1, 8), jnp.int32)
    mask = jnp.ones((1, 8), bool)
    return jax.jit(EmbeddingModel(config).init)(rng, token_ids, mask)["params"]
