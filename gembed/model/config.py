"""`ModelConfig`: every architectural choice of the embedding model, bound from gin.

One frozen (hashable) dataclass covers BERT/MiniLM-style post-norm encoders and modern
pre-norm ones (RMSNorm, RoPE, gated MLPs, grouped-query attention), so a single `Encoder`
can reproduce either family and be a static `jax.jit` argument.
"""
import dataclasses

import gin
import jax.numpy as jnp

from gembed.errors import GembedUserError
from gembed.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from gembed.model.matmul_precision import PRECISIONS as MATMUL_PRECISIONS

MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITION_EMBEDDINGS = ("learned", "rope", "none")
ATTENTION_MASKS = ("bidirectional", "causal")
POOLINGS = ("mean", "first", "last")
ROPE_SCALINGS = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "dots_saveable", "full")


def _invalid(field: str, value, requirement: str) -> GembedUserError:
    return GembedUserError(
        f"ModelConfig.{field}={value!r} {requirement}; fix the binding in your model gin file.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the encoder, pooling and projection (see field comments).

    Parameters are always float32; `dtype` is the compute dtype they are cast to at use.
    """

    vocab_size: int = 8000
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: num_heads; fewer: grouped-query attention.
    head_dim: int | None = None  # None: hidden_size // num_heads.
    mlp_dim: int = 256
    mlp_activation: str = "gelu"  # 'gelu' (exact erf), 'gelu_tanh', 'relu', 'silu'.
    mlp_gated: bool = False  # act(x·gate) * (x·up) → down (GeGLU, SwiGLU) instead of act(x·up) → down.
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm'.
    norm_eps: float = 1e-6
    rmsnorm_unit_offset: bool = False  # Gemma: scale by (1 + w), w initialised to 0.
    norm_position: str = "pre"  # 'pre': x + f(norm(x)); 'post' (BERT): norm(x + f(x)).
    final_norm: bool = True  # A norm after the last block (pre-norm nets want it, BERT does not).
    position_embedding: str = "learned"  # 'learned' | 'rope' | 'none'.
    max_position_embeddings: int = 512  # Rows of the learned position table.
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # Of the global layers: 'none' | 'linear' (frequencies / factor) | 'llama3'.
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are divided by factor,
    rope_high_freq_factor: float = 4.0  # ... those below original / this kept, those between blended.
    rope_original_max_positions: int = 8192  # llama3: the pre-training context length.
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers; None: rope_theta.
    sliding_window: int | None = None  # Local layers: keys < this many positions away (causal: earlier).
    local_layers: tuple[int, ...] = ()  # Indices of the sliding-window (local) layers.
    qk_norm: bool = False  # Qwen3, Gemma 3: a `norm` over head_dim of each query and key head.
    query_pre_attn_scalar: int | None = None  # Logits scale by its rsqrt; None: head_dim (Gemma 2/3).
    attention_logit_softcap: float | None = None  # Logits become c * tanh(logits / c) (Gemma 2).
    final_logit_softcap: float | None = None  # LM-head logits (generation only, not embeddings).
    sandwich_norm: bool = False  # Gemma 2/3: a norm on each sublayer's output before the add too.
    type_vocab_size: int = 0  # > 0: a token-type table whose row 0 is added to every token.
    embedding_norm: bool = False  # BERT: a norm right after summing the embeddings.
    embedding_scale: bool = False  # Gemma: token embeddings times sqrt(hidden_size).
    use_bias: bool = True  # Biases of the attention output and MLP dense layers.
    qkv_bias: bool | None = None  # None: use_bias (Qwen: q/k/v bias without an o-proj bias).
    attention_mask: str = "bidirectional"  # 'bidirectional' | 'causal'; pad keys always masked.
    pooling: str = "mean"  # 'mean' over real tokens | 'first' | 'last' real token (either padding side).
    projection_dim: int | None = None  # None: no projection after pooling.
    projection_bias: bool = True
    output_sizes: tuple[int, ...] | None = None  # Matryoshka prefix sizes, increasing, last = embedding_size.
    initial_temperature: float = 0.05  # The `log_scale` param starts at log(1 / initial_temperature).
    dtype: str = "float32"  # Compute dtype: 'float32' | 'bfloat16'.
    matmul_precision: str = "auto"  # Dense matmul inputs: auto | float32 | bfloat16 (gembed.model.matmul_precision).
    dropout_rate: float = 0.0  # After the attention output and the MLP, before the residual add.
    attention: str = "auto"  # Kernel (gembed.model.attention): auto | xla | cpu | cudnn | splash.
    remat: str = "dots_saveable"  # Per-block rematerialisation: none | dots_saveable | full (docs/accelerators.md).

    def __post_init__(self):
        if self.output_sizes is not None:
            object.__setattr__(self, "output_sizes", tuple(self.output_sizes))
        object.__setattr__(self, "local_layers", tuple(self.local_layers))
        self._check_choices()
        self._check_sizes()

    def _check_choices(self):
        for field, allowed in (
            ("mlp_activation", MLP_ACTIVATIONS),
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
            ("position_embedding", POSITION_EMBEDDINGS),
            ("attention_mask", ATTENTION_MASKS),
            ("pooling", POOLINGS),
            ("rope_scaling", ROPE_SCALINGS),
            ("dtype", DTYPES),
            ("matmul_precision", MATMUL_PRECISIONS),
            ("attention", ATTENTION_IMPLEMENTATIONS),
            ("remat", REMAT_POLICIES),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise _invalid(field, value, "is not one of " + ", ".join(map(repr, allowed)))
        if self.sandwich_norm and self.norm_position != "pre":
            raise _invalid("sandwich_norm", True, f"needs norm_position='pre', not {self.norm_position!r}")
        if self.rmsnorm_unit_offset and self.norm != "rmsnorm":
            raise _invalid("rmsnorm_unit_offset", True, f"needs norm='rmsnorm', not {self.norm!r}")

    def _check_sizes(self):
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                      "max_position_embeddings"):
            if getattr(self, field) < 1:
                raise _invalid(field, getattr(self, field), "must be a positive integer")
        for field in ("num_kv_heads", "head_dim", "projection_dim"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise _invalid(field, getattr(self, field), "must be None or a positive integer")
        if self.num_heads % self.effective_num_kv_heads:
            raise _invalid("num_kv_heads", self.num_kv_heads,
                           f"must divide num_heads={self.num_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise _invalid("num_heads", self.num_heads,
                           f"must divide hidden_size={self.hidden_size} (or set head_dim)")
        if self.position_embedding == "rope" and self.effective_head_dim % 2:
            raise _invalid("head_dim", self.effective_head_dim, "must be even for RoPE")
        if self.type_vocab_size < 0:
            raise _invalid("type_vocab_size", self.type_vocab_size, "must be >= 0")
        if not self.norm_eps > 0:
            raise _invalid("norm_eps", self.norm_eps, "must be > 0")
        if not self.initial_temperature > 0:
            raise _invalid("initial_temperature", self.initial_temperature, "must be > 0")
        if not 0 <= self.dropout_rate < 1:
            raise _invalid("dropout_rate", self.dropout_rate, "must be in [0, 1)")
        self._check_local_attention()
        if self.output_sizes is not None:
            sizes = self.output_sizes
            if (not sizes or sizes[0] < 1 or any(a >= b for a, b in zip(sizes, sizes[1:]))
                    or sizes[-1] != self.embedding_size):
                raise _invalid("output_sizes", sizes,
                               "must be strictly increasing positive sizes ending at the "
                               f"embedding size {self.embedding_size} (projection_dim or hidden_size)")

    def _check_local_attention(self):
        for field in ("sliding_window", "query_pre_attn_scalar", "attention_logit_softcap",
                      "final_logit_softcap", "rope_local_theta"):
            if getattr(self, field) is not None and not getattr(self, field) > 0:
                raise _invalid(field, getattr(self, field), "must be None or > 0")
        if any(not 0 <= index < self.num_layers for index in self.local_layers) or len(
                set(self.local_layers)) != len(self.local_layers):
            raise _invalid("local_layers", self.local_layers,
                           f"must be distinct layer indices in [0, {self.num_layers})")
        if self.local_layers and self.sliding_window is None:
            raise _invalid("local_layers", self.local_layers, "needs a sliding_window")
        if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
            raise _invalid("rope_scaling_factor", self.rope_scaling_factor, "must be > 0")
        if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise _invalid("rope_low_freq_factor", self.rope_low_freq_factor,
                           f"must be in (0, rope_high_freq_factor={self.rope_high_freq_factor})")

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (the form workdirs and model folders store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelConfig":
        """The config of stored fields (lists become tuples), ignoring any gin binding: a stored
        architecture is that model's alone. Fields it lacks take the class defaults."""
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        stored = {name: tuple(value) if isinstance(value, list) else value
                  for name, value in fields.items()}
        unknown = sorted(stored.keys() - defaults.keys())
        if unknown:
            raise TypeError(f"unknown ModelConfig fields {unknown}")
        return cls(**{**defaults, **stored})

    @property
    def effective_num_kv_heads(self) -> int:
        """Key/value heads: `num_kv_heads`, or `num_heads` when unset."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def effective_head_dim(self) -> int:
        """Width of one attention head: `head_dim`, or hidden_size // num_heads when unset."""
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def effective_qkv_bias(self) -> bool:
        """Whether query/key/value have biases: `qkv_bias`, or `use_bias` when unset."""
        return self.use_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def embedding_size(self) -> int:
        """Width of the model's output embedding: projection_dim, or hidden_size."""
        return self.hidden_size if self.projection_dim is None else self.projection_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a JAX dtype."""
        return jnp.dtype(self.dtype)
