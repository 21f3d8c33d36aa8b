"""Published Llama 2 shapes, shared by the model builders, the planner and the benchmarks.

Pure Python (no torch import), so the planner stays light and the builders and the planner can never
disagree about a model's sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MODEL_SHAPES", "ModelShape"]


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama 2 style decoder.

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

    def __post_init__(self) -> None:
        for name in (f.name for f in dataclasses.fields(self)):
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
        """Base (non-LoRA) parameters of one decoder layer, norms included."""
        d, i = self.embed_dim, self.intermediate_dim
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * i + 2 * d

    def base_params(self) -> int:
        """All base parameters: embeddings, layers, final norm, untied output projection."""
        return 2 * self.vocab_size * self.embed_dim + self.num_layers * self.layer_params() + self.embed_dim

    def lora_params(
        self, rank: int, modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj")
    ) -> int:
        """LoRA parameters (A and B) over all layers for the given attention projections."""
        d, kv = self.embed_dim, self.kv_dim
        out_dims = {"q_proj": d, "k_proj": kv, "v_proj": kv, "output_proj": d}
        return self.num_layers * sum(rank * (d + out_dims[m]) for m in modules)


#: Published Llama 2 shapes.
MODEL_SHAPES: dict[str, ModelShape] = {
    "7b": ModelShape(32_000, 32, 32, 32, 4096, 11008),
    "13b": ModelShape(32_000, 40, 40, 40, 5120, 13824),
    "70b": ModelShape(32_000, 80, 64, 8, 8192, 28672),
}
