"""Published model shapes (Llama 2, Llama 3.x, Mistral, Qwen2.5) for the builders, planner and benchmarks.

Pure Python (no torch import), so the planner stays light and the builders and the planner can never
disagree about a model's sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

__all__ = ["MODEL_SHAPES", "FamilyShape", "ModelShape"]


_SIZE_FIELDS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-style decoder (Llama 2 style: untied head, no biases).

    Attributes:
        vocab_size: Vocabulary size.
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA when fewer than ``num_heads``).
        embed_dim: Hidden size.
        intermediate_dim: SwiGLU hidden size.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int

    #: The LM head is the token embedding (see :class:`FamilyShape`); a class default, not a field, so
    #: ``dataclasses.asdict`` of a plain shape is still exactly the six builder arguments.
    tie_word_embeddings: ClassVar[bool] = False
    #: q/k/v projections have biases (Qwen2).
    qkv_bias: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must divide by num_heads {self.num_heads} and num_heads by "
                f"num_kv_heads {self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        """Per-head dimension."""
        return self.embed_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Base (non-LoRA) parameters of one decoder layer, norms (and q/k/v biases) included."""
        d, i = self.embed_dim, self.intermediate_dim
        bias = d + 2 * self.kv_dim if self.qkv_bias else 0
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * i + 2 * d + bias

    def base_params(self) -> int:
        """All base parameters: embeddings, layers, final norm, output projection (none when tied)."""
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.embed_dim
        return embeddings + self.num_layers * self.layer_params() + self.embed_dim

    def lora_params(
        self, rank: int, modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj")
    ) -> int:
        """LoRA parameters (A and B) over all layers for the given attention projections."""
        d, kv = self.embed_dim, self.kv_dim
        out_dims = {"q_proj": d, "k_proj": kv, "v_proj": kv, "output_proj": d}
        return self.num_layers * sum(rank * (d + out_dims[m]) for m in modules)


@dataclass(frozen=True)
class FamilyShape(ModelShape):
    """A published Llama 3.x / Mistral / Qwen2.5 shape and the facts its sized builder fixes or defaults.

    Attributes:
        tie_word_embeddings: The LM head is the token embedding (Llama 3.2 1B/3B, Qwen2.5 0.5B-3B).
        qkv_bias: q/k/v projections have biases (Qwen2).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta.
        max_position_embeddings: The published ``config.json`` ``max_position_embeddings``.
        rope_scaling: The published ``config.json`` ``rope_scaling`` entry as sorted ``(key, value)``
            pairs (hashable), or None for unscaled RoPE; ``dict(shape.rope_scaling)`` gives the entry.
    """

    tie_word_embeddings: bool = False  # type: ignore[misc]
    qkv_bias: bool = False  # type: ignore[misc]
    norm_eps: float = 1e-5
    rope_base: float = 10_000.0
    max_position_embeddings: int = 4096
    rope_scaling: Optional[tuple[tuple[str, Any], ...]] = None


def _llama3_rope(factor: float) -> tuple[tuple[str, Any], ...]:
    entry = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}  # fmt: skip
    return tuple(sorted(entry.items()))


_LLAMA3 = dict(rope_base=500_000.0, max_position_embeddings=8192)
_LLAMA3_1 = dict(rope_base=500_000.0, max_position_embeddings=131_072, rope_scaling=_llama3_rope(8.0))
_LLAMA3_2 = dict(_LLAMA3_1, rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True)
# Mistral-7B-v0.3 (no sliding window; v0.1's 4096-token window is not full attention).
_MISTRAL = dict(rope_base=1_000_000.0, max_position_embeddings=32_768)
# Qwen2.5 base models' config.json; their native context is 32768 (YaRN extends from there).
_QWEN = dict(qkv_bias=True, norm_eps=1e-6, rope_base=1_000_000.0, max_position_embeddings=131_072)
_QWEN_SMALL = dict(_QWEN, tie_word_embeddings=True)

#: Published shapes: Llama 2 under its sizes (``7b``, ...), the others under torchtune's builder names.
MODEL_SHAPES: dict[str, ModelShape] = {
    "7b": ModelShape(32_000, 32, 32, 32, 4096, 11008),
    "13b": ModelShape(32_000, 40, 40, 40, 5120, 13824),
    "70b": ModelShape(32_000, 80, 64, 8, 8192, 28672),
    "llama3_8b": FamilyShape(128_256, 32, 32, 8, 4096, 14336, **_LLAMA3),
    "llama3_1_8b": FamilyShape(128_256, 32, 32, 8, 4096, 14336, **_LLAMA3_1),
    "llama3_1_70b": FamilyShape(128_256, 80, 64, 8, 8192, 28672, **_LLAMA3_1),
    "llama3_2_1b": FamilyShape(128_256, 16, 32, 8, 2048, 8192, **_LLAMA3_2),
    "llama3_2_3b": FamilyShape(128_256, 28, 24, 8, 3072, 8192, **_LLAMA3_2),
    "llama3_3_70b": FamilyShape(128_256, 80, 64, 8, 8192, 28672, **_LLAMA3_1),
    "mistral_7b": FamilyShape(32_768, 32, 32, 8, 4096, 14336, **_MISTRAL),
    "qwen2_5_0_5b": FamilyShape(
        151_936, 24, 14, 2, 896, 4864, **dict(_QWEN_SMALL, max_position_embeddings=32_768)
    ),
    "qwen2_5_1_5b": FamilyShape(151_936, 28, 12, 2, 1536, 8960, **_QWEN_SMALL),
    "qwen2_5_3b": FamilyShape(
        151_936, 36, 16, 2, 2048, 11008, **dict(_QWEN_SMALL, max_position_embeddings=32_768)
    ),
    "qwen2_5_7b": FamilyShape(152_064, 28, 28, 4, 3584, 18944, **_QWEN),
    "qwen2_5_14b": FamilyShape(152_064, 48, 40, 8, 5120, 13824, **dict(_QWEN, norm_eps=1e-5)),
    "qwen2_5_32b": FamilyShape(152_064, 64, 40, 8, 5120, 27648, **dict(_QWEN, norm_eps=1e-5)),
    "qwen2_5_72b": FamilyShape(152_064, 80, 64, 8, 8192, 29568, **dict(_QWEN, norm_eps=1e-5)),
}
