"""FLOPs of one LongLoRA training step: projections, LoRA, S² or full attention, backward and recompute.

FLOPs count multiply-adds as two FLOPs. ``attention="dense"`` counts every score of every attended
block (torch's FlopCounterMode and the LongLoRA paper's convention); ``attention="causal"`` counts only
the lower triangle (what a causal kernel needs: the "model FLOPs" used for MFU). ``tests/test_plan.py``
checks the counts against ``torch.utils.flop_counter.FlopCounterMode`` on the real model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from longlora_tune.models.shapes import ModelShape
from longlora_tune.modules.s2_heads import shifted_heads
from longlora_tune.plan.facts import checkpointed_layers, tied_head_trained

__all__ = ["FlopEstimate", "s2_segment_lengths", "step_flops"]


def s2_segment_lengths(
    seq_len: int, group_size: int, *, wrap_around: bool = False
) -> tuple[list[int], list[int]]:
    """Lengths of the causal attention segments of the two S² head sets (unshifted and shifted heads).

    Args:
        seq_len: Sequence length ``N``.
        group_size: ``G`` (even).
        wrap_around: Paper Algorithm 1 (rolled tokens: the shifted heads have the same segment lengths as
            the unshifted ones) instead of the no-wrap form (``[0, G/2), [G/2, 3G/2), ...`` clipped at ``N``).

    Returns:
        ``(unshifted, shifted)`` lists of segment lengths, each summing to ``seq_len``.

    Raises:
        ValueError: If ``group_size`` is not an even int >= 2 or ``seq_len`` < 1.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")

    def chunks(n: int) -> list[int]:
        full, rest = divmod(n, group_size)
        return [group_size] * full + ([rest] if rest else [])

    first = chunks(seq_len)
    if wrap_around:
        return first, list(first)
    head = min(group_size // 2, seq_len)
    return first, [head, *chunks(seq_len - head)]


def _attention_pairs(
    seq_len: int, group_size: int | None, wrap_around: bool, causal: bool, num_heads: int
) -> float:
    """Query-key pairs scored per head (averaged over the heads of the two S² head sets)."""
    segments = (
        ([seq_len], [seq_len])
        if group_size is None
        else s2_segment_lengths(seq_len, group_size, wrap_around=wrap_around)
    )
    per_set = [sum(g * (g + 1) / 2 if causal else g * g for g in lengths) for lengths in segments]
    unshifted = shifted_heads(num_heads).start
    # Weights of exactly 1/2 for an even count, so the result equals the plain mean of the two sets.
    return (unshifted * per_set[0] + (num_heads - unshifted) * per_set[1]) / num_heads


@dataclass(frozen=True)
class FlopEstimate:
    """FLOPs of one training step (one micro-batch), multiply-add = 2 FLOPs.

    Attributes:
        forward_matmul: Projections, MLP, LoRA and output head in the forward pass.
        forward_attention: Score and value products in the forward pass.
        backward: Input gradients everywhere plus weight gradients of trainable matrices (LoRA).
        recompute: Forward of the checkpointed decoder layers again (up to the last op whose saved tensors
            backward needs).
        attention: ``"dense"`` or ``"causal"`` (see the module docstring).
    """

    forward_matmul: float
    forward_attention: float
    backward: float
    recompute: float
    attention: str

    @property
    def forward(self) -> float:
        """Forward FLOPs."""
        return self.forward_matmul + self.forward_attention

    @property
    def model(self) -> float:
        """Forward + backward, no recompute (the numerator of model FLOPs utilisation)."""
        return self.forward + self.backward

    @property
    def total(self) -> float:
        """Everything executed, recompute included."""
        return self.model + self.recompute

    @property
    def attention_share_forward(self) -> float:
        """Fraction of forward FLOPs spent in attention (the paper's Table 12 quantity)."""
        return self.forward_attention / self.forward


def step_flops(
    shape: ModelShape,
    seq_len: int,
    batch_size: int = 1,
    *,
    group_size: int | None = None,
    wrap_around: bool = False,
    activation_checkpointing: bool = True,
    checkpoint_layers: int | None = None,
    attention: str = "causal",
    lora_rank: int = 8,
    lora_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
    trainable_extras: Sequence[str] = ("embed", "norm"),
    sequence_tile_tokens: int | None = None,
) -> FlopEstimate:
    """FLOPs of one LongLoRA training step.

    Base weights are frozen, so their backward only computes input gradients (as many FLOPs as their
    forward); LoRA matrices also get weight gradients (twice their forward). Attention backward is
    counted as twice its forward (the four products for dQ, dK, dV and dScores); kernels that recompute
    the scores do half a forward more, which is hardware work, not model FLOPs. A tied LM head (Llama 3.2
    1B/3B, Qwen2.5 0.5B-3B) is the trained token embedding, so its weight gradient is computed too.

    Args:
        shape: Model sizes.
        seq_len: Tokens per sequence.
        batch_size: Sequences per micro-batch.
        group_size: S² group size; None means full causal attention.
        wrap_around: S² Algorithm 1 form (same FLOPs up to the segment clipping).
        activation_checkpointing: Count the recomputed layer forward.
        checkpoint_layers: With ``activation_checkpointing``, only this many layers are recomputed (the
            recipe's ``activation_checkpointing_layers``); None = all.
        attention: ``"causal"`` or ``"dense"``.
        lora_rank: LoRA rank.
        lora_modules: Attention projections with LoRA.
        trainable_extras: The recipe's ``trainable_extras`` (a tied head is trained with ``embed``).
        sequence_tile_tokens: The recipe's ``sequence_tile_tokens`` (None = off): every layer's MLP and
            q/k/v projections run their forward again, tile by tile, in backward; a checkpointed layer's
            recompute then skips the MLP (``longlora_tune.training.sequence_tiling``).

    Returns:
        The :class:`FlopEstimate`.

    Raises:
        ValueError: On an unknown ``attention`` mode, bad sizes or a bad ``checkpoint_layers``.
    """
    if attention not in ("causal", "dense"):
        raise ValueError(f"attention must be 'causal' or 'dense', got {attention!r}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    tokens = batch_size * seq_len
    d, kv, i = shape.embed_dim, shape.kv_dim, shape.intermediate_dim
    frozen_layer = 2 * tokens * (2 * d * d + 2 * d * kv + 3 * d * i)
    lora_layer = 2 * tokens * shape.lora_params(lora_rank, lora_modules) / shape.num_layers
    pairs = _attention_pairs(seq_len, group_size, wrap_around, attention == "causal", shape.num_heads)
    attn_layer = 2 * 2 * batch_size * shape.num_heads * shape.head_dim * pairs
    head = 2 * tokens * d * shape.vocab_size
    layers = shape.num_layers
    forward_matmul = layers * (frozen_layer + lora_layer) + head
    forward_attention = layers * attn_layer
    head_weight_grad = head if tied_head_trained(shape, trainable_extras) else 0
    backward = layers * (frozen_layer + 2 * lora_layer + 2 * attn_layer) + head + head_weight_grad
    # Non-reentrant checkpointing stops recomputing once every saved tensor is rebuilt: the frozen MLP down
    # projection, the layer's last matmul, feeds nothing that backward needs, so it is not rerun.
    down_proj = 2 * tokens * i * d
    recomputed = checkpointed_layers(layers, activation_checkpointing, checkpoint_layers)
    if sequence_tile_tokens is None:
        recompute = recomputed * (frozen_layer - down_proj + lora_layer + attn_layer)
    else:
        # Tiled: each layer's backward reruns its MLP's three matmuls and its q/k/v projections (with their
        # LoRA) tile by tile, and a checkpointed layer's recompute returns before the MLP (all it needs
        # back is the MLP block's input).
        mlp = 2 * tokens * 3 * d * i
        prefix_lora = [m for m in lora_modules if m in ("q_proj", "k_proj", "v_proj")]
        prefix = 2 * tokens * (d * d + 2 * d * kv + shape.lora_params(lora_rank, prefix_lora) / layers)
        recompute = recomputed * (frozen_layer - mlp + lora_layer + attn_layer) + layers * (mlp + prefix)
    return FlopEstimate(forward_matmul, forward_attention, backward, recompute, attention)
