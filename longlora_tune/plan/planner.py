"""Memory and FLOP planner for LongLoRA training runs.

``python -m longlora_tune.plan --config llama2_7b_100k --gpus 8 --gpu-memory 80`` estimates, per GPU, the
memory of one training step (weights, gradients, optimizer state, saved activations, the chunked-loss
logits, transient backward buffers and workspace) and the FLOPs of the step with S²-Attn and with full
attention, says whether it fits and suggests settings that make it fit.

The activation model is written for the code this project actually runs: torchtune's LoRA Llama 2
(``TransformerSelfAttentionLayer``: RMSNorm computed in float32, LoRA on q/k/v/o with frozen base weights,
SwiGLU MLP, trainable embeddings and norms) with our S² attention callable and torchtune's
``CEWithChunkedOutputLoss``. Every term below is the storage that autograd keeps for backward, counted
once per storage (tensors that share a storage are not double counted). ``tests/test_plan.py`` checks
the model against the bytes that ``torch.autograd.graph.saved_tensors_hooks`` sees.

Parameters, gradients and AdamW state follow the recipe's ``fp32_trainable_params`` (default true): in a
bf16 run the trainable tensors (LoRA, embeddings, norms) are fp32 master copies, so they, their gradients
(FSDP2 reduces in fp32) and AdamW's two moments take 4 + 4 + 8 bytes per trainable parameter, sharded over
the GPUs, while the frozen base weights stay in the compute dtype. Settings the recipe derives are derived
by the same functions: the trainable set by :func:`longlora_tune.models.trainable.trainable_param_names` on
the model the builder makes (on the meta device), the S² group size by
:meth:`~longlora_tune.modules.s2_attention.S2AttentionConfig.resolve_group_size`, and the training length,
its check against the group size and the gradient accumulation by the recipe's own functions, so a config
the recipe refuses is refused here with the same message.

FLOPs count multiply-adds as two FLOPs. ``attention="dense"`` counts every score of every attended
block (torch's FlopCounterMode and the LongLoRA paper's convention); ``attention="causal"`` counts only
the lower triangle (what a causal kernel needs: the "model FLOPs" used for MFU).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longlora_tune._io import atomic_write_json
from longlora_tune.models.shapes import _SIZE_FIELDS, MODEL_SHAPES, FamilyShape, ModelShape
from longlora_tune.modules.s2_heads import shifted_heads
from longlora_tune.plan.communication import (
    halo_bytes_per_layer,
    ring_bytes_per_layer,
    ulysses_bytes_per_layer,
)

__all__ = [
    "MODEL_SHAPES",
    "ActivationEstimate",
    "FlopEstimate",
    "ModelShape",
    "Plan",
    "activation_bytes",
    "checkpointed_layers",
    "load_config_settings",
    "main",
    "model_family",
    "parameter_counts",
    "plan",
    "s2_segment_lengths",
    "step_flops",
    "tile_backward_bytes",
]

GIB = 1024**3
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_FP32 = 4
_INT64 = 8
#: CUDA context, cuBLAS and NCCL workspaces: resident on the GPU but outside the caching allocator.
_CONTEXT_BYTES = int(1.5 * GIB)
#: Caching-allocator fragmentation on top of the bytes live at the peak.
_FRAGMENTATION = 0.05
# The two phases of a step that do not overlap: only the larger one adds to the peak.
_LOSS_PHASE = "loss phase: fp32 log-probs + logits (*)"
_LINEAR_CE_PHASE = "loss phase: one chunk's logits + hidden-state gradient (*)"
_LAYER_PHASE = "layer backward phase: recompute + grads (*)"
#: The tile size the planner suggests: one tile's SwiGLU tensors are then about 1.3 GiB at Llama 3's width.
SUGGESTED_TILE_TOKENS = 8192


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


def checkpointed_layers(
    num_layers: int, activation_checkpointing: bool, checkpoint_layers: int | None
) -> int:
    """How many decoder layers are checkpointed (the first N, as
    ``longlora_tune.training.activation_checkpointing``).

    Args:
        num_layers: Decoder layers of the model.
        activation_checkpointing: The recipe's ``enable_activation_checkpointing``.
        checkpoint_layers: The recipe's ``activation_checkpointing_layers`` (None = all).

    Returns:
        N in ``[0, num_layers]``: 0 without checkpointing, ``num_layers`` for "all".

    Raises:
        ValueError: For a count outside ``[0, num_layers]``, or a positive count with checkpointing off.
    """
    if checkpoint_layers is None:
        return num_layers if activation_checkpointing else 0
    if isinstance(checkpoint_layers, bool) or not isinstance(checkpoint_layers, int):
        raise ValueError(f"checkpoint_layers must be an int or None (all), got {checkpoint_layers!r}")
    if not 0 <= checkpoint_layers <= num_layers:
        raise ValueError(
            f"activation_checkpointing_layers={checkpoint_layers} must be in [0, {num_layers}] "
            f"(the model has {num_layers} decoder layers)"
        )
    if checkpoint_layers and not activation_checkpointing:
        raise ValueError(
            f"activation_checkpointing_layers={checkpoint_layers} needs activation checkpointing on"
        )
    return checkpoint_layers


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


def _tied_head_trained(shape: ModelShape, trainable_extras: Sequence[str]) -> bool:
    """The LM head is the token embedding and the embedding is trained: the head gets a weight gradient."""
    return shape.tie_word_embeddings and "embed" in tuple(trainable_extras)


def _rotates_pairs(shape: ModelShape, family: str | None) -> bool:
    """RoPE on interleaved pairs (torchtune's Llama/Mistral) rather than head halves (Qwen2)."""
    from longlora_tune.models.families import FAMILIES

    return FAMILIES[model_family(shape, family)].qk_permuted


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
        sequence_tile_tokens: The recipe's ``sequence_tile_tokens`` (None = off): every layer's MLP runs
            its forward again, tile by tile, in backward; a checkpointed layer's recompute then skips the
            MLP (``longlora_tune.training.sequence_tiling``).

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
    head_weight_grad = head if _tied_head_trained(shape, trainable_extras) else 0
    backward = layers * (frozen_layer + 2 * lora_layer + 2 * attn_layer) + head + head_weight_grad
    # Non-reentrant checkpointing stops recomputing once every saved tensor is rebuilt: the frozen MLP down
    # projection, the layer's last matmul, feeds nothing that backward needs, so it is not rerun.
    down_proj = 2 * tokens * i * d
    recomputed = checkpointed_layers(layers, activation_checkpointing, checkpoint_layers)
    if sequence_tile_tokens is None:
        recompute = recomputed * (frozen_layer - down_proj + lora_layer + attn_layer)
    else:
        # Tiled: each layer's backward reruns its MLP's three matmuls tile by tile, and a checkpointed
        # layer's recompute returns before the MLP (all it needs back is the MLP block's input).
        mlp = 2 * tokens * 3 * d * i
        recompute = recomputed * (frozen_layer - mlp + lora_layer + attn_layer) + layers * mlp
    return FlopEstimate(forward_matmul, forward_attention, backward, recompute, attention)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation memory of one micro-batch in bytes.

    Attributes:
        per_layer_saved: Bytes one decoder layer keeps for backward without checkpointing.
        layers_saved: Bytes all decoder layers keep (a checkpointed layer keeps its input only).
        head_saved: Final norm, token ids and labels.
        loss_saved: What the loss keeps for backward: float32 log-probabilities (torchtune's chunked cross
            entropy), or the hidden-state gradient computed in forward (``ChunkedLinearCrossEntropyLoss``).
        recompute_transient: Bytes beyond ``layers_saved`` at the peak of the layers' backward: the
            gradients of one layer, plus its rebuilt activations when every layer is checkpointed (with
            the first N < all checkpointed, the kept layers free theirs before any recompute starts); with
            sequence tiling, one tile's rebuilt MLP block and its gradients instead of the whole MLP's.
        logits_transient: Extra bytes while the loss runs (low-precision logits and one float32 chunk, or
            one chunk's logits and their gradient with ``ChunkedLinearCrossEntropyLoss``).
    """

    per_layer_saved: int
    layers_saved: int
    head_saved: int
    loss_saved: int
    recompute_transient: int
    logits_transient: int

    @property
    def saved(self) -> int:
        """Everything autograd holds for backward at the end of the forward pass."""
        return self.layers_saved + self.head_saved + self.loss_saved

    @property
    def loss_phase(self) -> int:
        """Bytes beyond the layers' saved activations while the loss runs and starts its backward."""
        return self.loss_saved + self.logits_transient

    @property
    def peak(self) -> int:
        """Peak activation bytes: the layers' saved tensors plus the larger of the two phases.

        Backward frees the loss's log-probabilities before it reaches the decoder layers, so the loss phase
        and the recompute/backward of a layer do not overlap.
        """
        return self.layers_saved + self.head_saved + max(self.loss_phase, self.recompute_transient)


def tile_backward_bytes(shape: ModelShape, tile_tokens: int, dtype: str = "bf16") -> int:
    """Peak bytes one tile of a tiled MLP block allocates while backward recomputes and back-propagates it.

    The tile's RMSNorm rebuilt in float32 (a float32 copy of the input unless the dtype is float32, the
    normalised tensor and the inverse RMS), the block's output for the tile, the three SwiGLU tensors that
    backward needs (gate projection, its SiLU, up projection) and the three ``intermediate_dim`` gradients
    that exist together (of the down projection's input and of the two factors of the product). Measured
    against the ops' allocations in ``tests/test_plan.py``.

    Args:
        shape: Model sizes.
        tile_tokens: Tokens in the tile.
        dtype: Compute dtype.

    Returns:
        The bytes.
    """
    e = _DTYPE_BYTES[dtype]
    d, i, t = shape.embed_dim, shape.intermediate_dim, tile_tokens
    norm = (_FP32 if e != _FP32 else 0) * t * d + _FP32 * t * d + _FP32 * t
    return norm + e * t * d + 6 * e * t * i


def activation_bytes(
    shape: ModelShape,
    seq_len: int,
    batch_size: int = 1,
    *,
    dtype: str = "bf16",
    s2: bool = True,
    activation_checkpointing: bool = True,
    checkpoint_layers: int | None = None,
    loss_chunks: int = 8,
    lora_rank: int = 8,
    lora_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
    family: str | None = None,
    trainable_extras: Sequence[str] = ("embed", "norm"),
    linear_ce: bool = False,
    sequence_tile_tokens: int | None = None,
) -> ActivationEstimate:
    """Activation bytes of a LongLoRA training step (LoRA on attention, trainable embeddings/norms).

    Per layer, autograd keeps: for each of the two RMSNorms (computed in float32) the float32 input and
    normalised tensor and the float32 inverse RMS; the normed hidden state that the LoRA A matrices read;
    each LoRA B input (``rank`` wide); q, k, v (keys and values already expanded to all heads) and the
    attention output plus a float32 log-sum-exp per head and token; with S² also the output re-assembled
    from the groups (full attention's output is laid out so that the output projection reads it in
    place); and three ``intermediate_dim`` tensors of the SwiGLU MLP. The frozen projections keep only their
    weights. A checkpointed layer keeps just its input. The head keeps the final norm's float32
    tensors, the int64 token ids and labels, and the loss keeps float32 log-probabilities for every token
    (chunking the loss bounds only the float32 upcast, not what backward keeps).

    The families differ in two places (GQA needs nothing extra: keys and values are expanded to all heads
    before attention, as above). Qwen2's RoPE rotates head halves and keeps the cos and sin it casts to the
    compute dtype, for q and k: ``4 x seq_len x head_dim`` elements per layer (shared by the batch, which
    has no per-sample positions when unpacked). A tied LM head that is trained (``embed``) keeps its input,
    the final norm's output, for its weight gradient, and that gradient (``vocab x embed_dim``, plus the
    one it accumulates into) exists while the loss is back-propagated.

    With ``linear_ce`` (:class:`longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss`) no logits
    outlive
    the loss: it keeps the hidden-state gradient (``tokens x embed_dim`` in the compute dtype) and, for a
    trained tied head, the weight gradient; while it runs, its input (the final norm's output) and one
    chunk's float32 logits with their compute-dtype copy exist (plus the float32 weight-gradient
    accumulators when tied).

    With ``sequence_tile_tokens`` T (:mod:`longlora_tune.training.sequence_tiling`) a layer's MLP block
    (the second norm and the SwiGLU MLP) keeps only its input, and its backward holds one tile of
    ``min(T, batch x seq_len)`` tokens at a time (:func:`tile_backward_bytes`) instead of the whole MLP's
    rebuilt intermediates and gradients, so that part of the layer-backward phase no longer grows with the
    length.

    Args:
        shape: Model sizes.
        seq_len: Tokens per sequence.
        batch_size: Sequences per micro-batch.
        dtype: Parameter/activation dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        s2: S² attention (else full attention).
        activation_checkpointing: torchtune's per-layer activation checkpointing.
        checkpoint_layers: With ``activation_checkpointing``, only the first N layers are checkpointed
            (the recipe's ``activation_checkpointing_layers``); None = all.
        loss_chunks: Chunks of the loss (1 for a plain cross entropy).
        lora_rank: LoRA rank.
        lora_modules: Attention projections with LoRA.
        family: The model's family (:func:`model_family`; None infers it from the shape).
        trainable_extras: The recipe's ``trainable_extras`` (a tied head is trained with ``embed``).
        linear_ce: The loss is ``ChunkedLinearCrossEntropyLoss`` instead of ``CEWithChunkedOutputLoss``.
        sequence_tile_tokens: Tokens per tile of the MLP blocks (the recipe's ``sequence_tile_tokens``);
            None = not tiled.

    Returns:
        The :class:`ActivationEstimate`.

    Raises:
        ValueError: On an unknown dtype, bad sizes or a bad ``checkpoint_layers``.
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    n_ckpt = checkpointed_layers(shape.num_layers, activation_checkpointing, checkpoint_layers)
    if seq_len < 1 or batch_size < 1 or loss_chunks < 1:
        raise ValueError(
            f"seq_len, batch_size and loss_chunks must be >= 1, got {seq_len}, {batch_size}, {loss_chunks}"
        )
    e = _DTYPE_BYTES[dtype]
    t = batch_size * seq_len
    d, i, v = shape.embed_dim, shape.intermediate_dim, shape.vocab_size
    hidden = t * d
    norm = 2 * _FP32 * hidden + _FP32 * t
    lora = e * hidden + len(lora_modules) * e * t * lora_rank
    attention = 4 * e * hidden + _FP32 * t * shape.num_heads + (e * hidden if s2 else 0)
    mlp = 3 * e * t * i
    rope = 0 if _rotates_pairs(shape, family) else 4 * e * seq_len * shape.head_dim
    # Tiled, the MLP block (its norm and the MLP) keeps only its input, the hidden state.
    mlp_block = norm + mlp if sequence_tile_tokens is None else e * hidden
    per_layer = norm + lora + attention + mlp_block + rope
    layers_saved = n_ckpt * e * hidden + (shape.num_layers - n_ckpt) * per_layer
    tied = _tied_head_trained(shape, trainable_extras)
    # The fused loss computes the tied head's weight gradient in forward: it keeps no head input.
    head_saved = norm + 2 * _INT64 * t + (e * hidden if tied and not linear_ce else 0)
    loss_saved = e * hidden + (e * v * d if tied else 0) if linear_ce else _FP32 * t * v
    # Backward of one layer: gradients of its input and output, dq/dk/dv and two MLP-wide gradients; a
    # checkpointed layer's own activations are rebuilt first. Backward runs from the last layer to the first,
    # so with the first N < all layers checkpointed the kept layers have freed at least one layer's
    # activations before the first recompute: the rebuilt layer only adds to the peak when all are.
    # Tiled, one tile's rebuilt MLP block and its gradients replace the MLP-wide gradients.
    mlp_grads = (
        2 * e * t * i
        if sequence_tile_tokens is None
        else tile_backward_bytes(shape, min(sequence_tile_tokens, t), dtype)
    )
    grads = 5 * e * hidden + mlp_grads
    recompute_transient = grads + (per_layer if n_ckpt == shape.num_layers else 0)
    if linear_ce:
        # One chunk's fp32 logits with their compute-dtype copy (the matmul's output, or the gradient cast
        # for the backward matmuls; none in fp32); the final norm's output, the op's input, is alive
        # throughout. A trained tied head adds its fp32 weight-gradient accumulator and each chunk's fp32
        # contribution (in fp32 the accumulator is the gradient kept, counted in loss_saved).
        chunk = -(-t // loss_chunks)
        low = e if e != _FP32 else 0
        accumulators = (_FP32 + (_FP32 if low else 0)) * v * d if tied else 0
        logits_transient = (_FP32 + low) * chunk * v + e * hidden + accumulators
    else:
        logits_transient = e * t * v + 2 * _FP32 * t * v // loss_chunks + (2 * e * v * d if tied else 0)
    return ActivationEstimate(
        per_layer, layers_saved, head_saved, loss_saved, recompute_transient, logits_transient
    )


# ----------------------------------------------------------------------------------------------------
# Settings the recipe derives, derived here by the same functions
# ----------------------------------------------------------------------------------------------------


def _resolve_group_size(max_seq_len: int, group_size: int | None, group_size_ratio: float | None) -> int:
    """The S² group size the model builder would use (one rule: ``S2AttentionConfig.resolve_group_size``).

    Raises:
        ValueError: With the builder's message, e.g. for a ratio whose product with ``max_seq_len`` is not
            an even integer.
    """
    from longlora_tune.modules.s2_attention import S2AttentionConfig

    config = S2AttentionConfig(group_size_ratio=group_size_ratio, group_size=group_size)
    return config.resolve_group_size(max_seq_len)


#: The planner's families (:data:`longlora_tune.models.families.FAMILIES`) and the first name of their
# published
#: shapes in :data:`MODEL_SHAPES`; Llama 2's sizes are named ``7b``, ``13b``, ``70b``.
_FAMILY_PREFIXES = (("llama3", "llama3"), ("mistral", "mistral"), ("qwen2", "qwen2"))


def model_family(model: str | ModelShape, family: str | None = None) -> str:
    """The family whose builder makes ``model``: given, from its :data:`MODEL_SHAPES` name, or its shape.

    A custom :class:`ModelShape` without a family is planned as the family its structure needs: Qwen2 for
    q/k/v biases, Llama 3 for tied embeddings (Llama 2 and Mistral never tie), else Llama 2 (whose
    parameters and activations are the same as an untied Llama 3's or a Mistral's of the same sizes).

    Args:
        model: A :data:`MODEL_SHAPES` name or a shape.
        family: ``llama2``, ``llama3``, ``mistral`` or ``qwen2``; None infers it.

    Returns:
        The family name.

    Raises:
        ValueError: For an unknown family, or one whose builders cannot make the shape (biases outside
            Qwen2, tied embeddings in Llama 2 or Mistral, Qwen2 without biases).
    """
    from longlora_tune.models.families import FAMILIES

    shape = MODEL_SHAPES.get(model) if isinstance(model, str) else model
    if family is None:
        if isinstance(model, str):
            family = next((f for prefix, f in _FAMILY_PREFIXES if model.startswith(prefix)), "llama2")
        elif shape is not None and shape.qkv_bias:
            family = "qwen2"
        else:
            family = "llama3" if shape is not None and shape.tie_word_embeddings else "llama2"
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    if isinstance(shape, ModelShape):
        spec = FAMILIES[family]
        if shape.qkv_bias != spec.qkv_bias:
            has = "has" if shape.qkv_bias else "has no"
            raise ValueError(f"the shape {has} q/k/v biases and longlora_{family} cannot build it")
        if shape.tie_word_embeddings and not spec.ties:
            raise ValueError(f"the shape ties its embeddings and longlora_{family} cannot build it")
    return family


@functools.lru_cache(maxsize=32)
def _parameter_counts(
    shape: ModelShape,
    family: str,
    lora_rank: int,
    lora_modules: tuple[str, ...],
    trainable_extras: tuple[str, ...],
) -> tuple[int, int]:
    import torch

    from longlora_tune._compat import import_object
    from longlora_tune.models.families import FAMILIES
    from longlora_tune.models.trainable import trainable_param_names

    spec = FAMILIES[family]
    sizes = {f: getattr(shape, f) for f in _SIZE_FIELDS}
    if spec.ties:
        sizes["tie_word_embeddings"] = shape.tie_word_embeddings
    # Parameter counts do not depend on the length, the RoPE or the attention form; the smallest valid ones
    # keep the meta build cheap (no RoPE cache, no group-size constraint).
    with torch.device("meta"):
        model = import_object(spec.builder)(
            **sizes,
            max_seq_len=2,
            lora_rank=lora_rank,
            lora_attn_modules=lora_modules,
            s2_group_size=2,
            use_full_attn=True,
        )
    # named_parameters lists a tied LM head once: it is the token embedding.
    params = dict(model.named_parameters())
    trainable = sum(params[name].numel() for name in trainable_param_names(model, extras=trainable_extras))
    return trainable, sum(p.numel() for p in params.values())


def parameter_counts(
    shape: ModelShape,
    *,
    lora_rank: int = 8,
    lora_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
    trainable_extras: Sequence[str] = ("embed", "norm"),
    family: str | None = None,
) -> tuple[int, int]:
    """Trainable and total parameters of the LongLoRA model the family's builder makes for ``shape``.

    The model is built on the meta device by the family's component builder (``longlora_llama2``,
    ``longlora_llama3``, ``longlora_mistral`` or ``longlora_qwen2``) and the trainable set is
    :func:`longlora_tune.models.trainable.trainable_param_names`, the function the recipe trains with. A tied
    LM head
    is the token embedding: counted once, and trained with it.

    Args:
        shape: Model sizes.
        lora_rank: LoRA rank.
        lora_modules: Attention projections with LoRA.
        trainable_extras: The recipe's ``trainable_extras``: a subset of ``("embed", "norm")``.
        family: The builder's family; None infers it (:func:`model_family`).

    Returns:
        ``(trainable, total)`` parameter counts (total = base + LoRA).

    Raises:
        ValueError: On settings the builder or the trainable-set rule refuses.
    """
    if isinstance(trainable_extras, str) or isinstance(lora_modules, str):
        raise ValueError(
            f"trainable_extras and lora_modules must be lists, got {trainable_extras!r}, {lora_modules!r}"
        )
    family = model_family(shape, family)
    return _parameter_counts(shape, family, int(lora_rank), tuple(lora_modules), tuple(trainable_extras))


@dataclass
class Plan:
    """Memory and FLOP plan of one training step per GPU.

    Attributes:
        model: Model name or ``"custom"``.
        family: The builder's family (``llama2``, ``llama3``, ``mistral``, ``qwen2``).
        shape: Model sizes.
        seq_len: Training length.
        max_seq_len: The model's ``max_seq_len`` (sizes the S² group; >= ``seq_len``).
        batch_size: Micro-batch per GPU.
        gpus: Data-parallel GPUs.
        gpu_memory_gib: Memory per GPU.
        dtype: Compute dtype (activations, frozen weights).
        fp32_trainable_params: Trainable tensors, their gradients and AdamW state kept in fp32 (the
            recipe's default); else in ``dtype``.
        activation_checkpointing: Per-layer activation checkpointing.
        fsdp: Parameters, gradients and optimizer state sharded over ``gpus`` (FSDP2).
        s2: S² attention (else full).
        group_size: S² group size used.
        loss_chunks: Chunks of the cross-entropy loss.
        lora_rank: LoRA rank.
        trainable_extras: Trained besides LoRA (the recipe's ``trainable_extras``).
        global_batch_size: Sequences per optimizer step over all GPUs (None when not given).
        gradient_accumulation_steps: Micro-batches per optimizer step, by the recipe's rule (None without
            ``global_batch_size``).
        activation_offloading: Saved layer activations kept in host memory.
        cpu_offload: Sharded parameters, gradients and optimizer state kept in host memory.
        trainable_params: LoRA + the extras (embeddings and norms by default).
        total_params: Base + LoRA parameters.
        memory: Per-GPU bytes by component (frozen weights, trainable parameters, gradients, AdamW state,
            FSDP buffers, saved activations, the loss phase and the layer-backward phase, overhead).
        peak_bytes: Estimated peak per GPU: every component, but only the larger of the two phases.
        fits: ``peak_bytes <= gpu_memory_gib``.
        flops: FLOPs of the step as configured (causal counting).
        flops_full_attention: The same step with full attention.
        max_seq_len_fitting: Longest length (multiple of 1024 x the context-parallel degree) that fits with
            these settings, 0 if none.
        context_parallel_degree: GPUs sharing each sequence (the recipe's ``context_parallel_degree``);
            activations are per slice of ``seq_len / degree`` tokens, FSDP still shards over all ``gpus``.
        communication_per_layer: Bytes one GPU receives per layer and micro-batch for attention across the
            slices (forward, recompute and backward): ``halo`` (this recipe's S² halo exchange), ``ring``
            (ring attention) and ``ulysses`` (head-parallel all-to-all), for comparison; empty at degree 1.
        communication_per_step: The same per optimizer step (all layers and micro-batches).
        suggestions: Changes that make the run fit (empty when it fits).
        checkpoint_layers: Decoder layers checkpointed (the first N; ``num_layers`` = all, 0 = none).
        checkpoint_layers_peak_bytes: The peak per GPU with the first N layers checkpointed, for N = 0 ..
            ``num_layers`` (index N), everything else as planned.
        checkpoint_suggestion: The smallest N whose peak fits (``layers``), its ``peak_bytes``, and the
            FLOPs it saves per step against checkpointing every layer (``flops_saved_vs_all``, and as a
            fraction of that step: ``fraction_of_step_saved_vs_all``); None when no N fits.
        linear_ce: The loss is ``ChunkedLinearCrossEntropyLoss`` (else torchtune's
            ``CEWithChunkedOutputLoss``).
        sequence_tile_tokens: Tokens per tile of the MLP blocks (None: not tiled).
    """

    model: str
    family: str
    shape: ModelShape
    seq_len: int
    max_seq_len: int
    batch_size: int
    gpus: int
    gpu_memory_gib: float
    dtype: str
    fp32_trainable_params: bool
    activation_checkpointing: bool
    fsdp: bool
    s2: bool
    group_size: int | None
    loss_chunks: int
    lora_rank: int
    trainable_extras: tuple[str, ...]
    global_batch_size: int | None
    gradient_accumulation_steps: int | None
    activation_offloading: bool
    cpu_offload: bool
    trainable_params: int
    total_params: int
    memory: dict[str, int]
    peak_bytes: int
    fits: bool
    flops: FlopEstimate
    flops_full_attention: FlopEstimate
    max_seq_len_fitting: int = 0
    context_parallel_degree: int = 1
    communication_per_layer: dict[str, int] = field(default_factory=dict)
    communication_per_step: dict[str, int] = field(default_factory=dict)
    suggestions: list[str] = field(default_factory=list)
    checkpoint_layers: int = 0
    checkpoint_layers_peak_bytes: list[int] = field(default_factory=list)
    checkpoint_suggestion: dict[str, Any] | None = None
    linear_ce: bool = False
    sequence_tile_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (FLOP estimates expanded with their derived totals)."""
        out = dataclasses.asdict(self)
        for key in ("flops", "flops_full_attention"):
            est: FlopEstimate = getattr(self, key)
            out[key].update(
                forward=est.forward,
                model=est.model,
                total=est.total,
                attention_share_forward=est.attention_share_forward,
            )
        out["peak_gib"] = self.peak_bytes / GIB
        return out

    def _trainable_dtype_note(self) -> str:
        if self.dtype == "fp32":
            return ""
        if self.fp32_trainable_params:
            return " with fp32 master copies of the trainable tensors"
        return f", trainable tensors in {self.dtype}"

    def _context_parallel_note(self) -> str:
        p = self.context_parallel_degree
        if p == 1:
            return ""
        return f"context parallel {p} ({self.gpus // p} data x {p} context, {self.seq_len // p} tokens/GPU), "

    def _checkpointing_note(self) -> str:
        n, layers = self.checkpoint_layers, self.shape.num_layers
        if n == layers:
            return "on"
        return "off" if n == 0 else f"on for the first {n} of {layers} layers"

    def _tiling_note(self) -> str:
        return f", MLP in tiles of {self.sequence_tile_tokens} tokens" if self.sequence_tile_tokens else ""

    def _checkpointing_suggestion(self) -> list[str]:
        layers = self.shape.num_layers
        if self.checkpoint_suggestion is None:
            return [
                f"- activation checkpointing: no number of checkpointed layers fits (peak with all {layers}: "
                f"{self.checkpoint_layers_peak_bytes[-1] / GIB:.1f} GiB)"
            ]
        k = self.checkpoint_suggestion["layers"]
        saved = self.checkpoint_suggestion["flops_saved_vs_all"]
        share = self.checkpoint_suggestion["fraction_of_step_saved_vs_all"]
        return [
            f"- activation checkpointing: the smallest number of layers to checkpoint that fits is {k} of "
            f"{layers} (`activation_checkpointing_layers: {k if k < layers else 'all'}`, peak "
            f"{self.checkpoint_suggestion['peak_bytes'] / GIB:.1f} GiB); against all {layers} it saves "
            f"{saved / 1e12:.1f} TFLOPs per step ({100 * share:.1f}% of the step)"
        ]

    def table(self) -> str:
        """Markdown report: memory breakdown, FLOPs, verdict and suggestions."""
        lines = [
            f"## {self.model} ({self.family}): {self.seq_len} tokens x {self.batch_size}/GPU on {self.gpus} "
            "GPU(s) "
            f"of {self.gpu_memory_gib:g} GiB",
            "",
            f"dtype {self.dtype}{self._trainable_dtype_note()}, "
            f"activation checkpointing {self._checkpointing_note()}"
            f"{', activation offloading' if self.activation_offloading else ''}"
            f"{self._tiling_note()}"
            f"{', fsdp_cpu_offload' if self.cpu_offload else ''}, "
            f"FSDP {'on' if self.fsdp else 'off'}, "
            f"{self._context_parallel_note()}"
            f"attention {'S2 G=' + str(self.group_size) if self.s2 else 'full'}"
            f", loss {'ChunkedLinearCrossEntropyLoss' if self.linear_ce else 'CEWithChunkedOutputLoss'} "
            f"in {self.loss_chunks} chunks, trainable {self.trainable_params / 1e6:.1f}M of "
            f"{self.total_params / 1e9:.2f}B"
            + (
                f", gradient accumulation {self.gradient_accumulation_steps}"
                if self.gradient_accumulation_steps is not None
                else ""
            ),
            "",
            "| memory per GPU | GiB |",
            "|---|---:|",
        ]
        lines += [f"| {name} | {value / GIB:.2f} |" for name, value in self.memory.items()]
        lines += [
            f"| **peak** | **{self.peak_bytes / GIB:.2f}** |",
            "",
            "(*) the two phases do not overlap; only the larger adds to the peak.",
            "",
        ]
        lines += [
            "| FLOPs per step (causal) | S2 / as configured | full attention |",
            "|---|---:|---:|",
        ]
        for label, attr in (
            ("forward", "forward"),
            ("model (fwd+bwd)", "model"),
            ("with recompute", "total"),
        ):
            lines.append(
                f"| {label} | {getattr(self.flops, attr) / 1e12:.1f} T | "
                f"{getattr(self.flops_full_attention, attr) / 1e12:.1f} T |"
            )
        lines.append(
            f"| attention share of forward | {100 * self.flops.attention_share_forward:.1f}% | "
            f"{100 * self.flops_full_attention.attention_share_forward:.1f}% |"
        )
        if self.communication_per_layer:
            names = {
                "halo": "S2 halo exchange (this recipe)",
                "ring": "ring attention",
                "ulysses": "all-to-all",
            }
            lines += [
                "",
                "| attention traffic received per GPU | per layer | per optimizer step |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {names[k]} | {self.communication_per_layer[k] / 2**20:.1f} MiB | "
                f"{self.communication_per_step[k] / GIB:.2f} GiB |"
                for k in names
            ]
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines += [
            "",
            f"**{verdict}**: peak {self.peak_bytes / GIB:.1f} GiB of {self.gpu_memory_gib:g} GiB; "
            f"longest length that fits with these settings: {self.max_seq_len_fitting or 'none'}",
        ]
        lines += [f"- {s}" for s in self.suggestions]
        lines += self._checkpointing_suggestion()
        return "\n".join(lines)


#: torchao NF4 (torchtune's ``quantize_base``): 64-weight blocks, their scales quantized to int8 in groups of
#: 256 blocks with one scale per group in the original dtype, plus a per-tensor mean and the 16-entry table.
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256


def nf4_bytes(numel: int, dtype: str = "bf16") -> int:
    """Bytes of one ``torchao`` ``NF4Tensor`` holding ``numel`` weights quantized from ``dtype``.

    ``numel / 2`` packed 4-bit codes, ``numel / 64`` int8 block scales, ``numel / 16384`` group scales and
    17 single values (the scale mean and the 16 NF4 levels) in ``dtype``: 0.5157 bytes per weight in bf16.

    Args:
        numel: Weights in the tensor (a multiple of 16384, as torchao requires).
        dtype: The weight's original dtype (``bf16``, ``fp16`` or ``fp32``).

    Returns:
        The tensor's bytes.

    Raises:
        ValueError: If ``numel`` is not a whole number of scale groups.
    """
    group = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    if numel <= 0 or numel % group:
        raise ValueError(f"NF4 needs a positive multiple of {group} weights, got {numel}")
    e = _DTYPE_BYTES[dtype]
    return numel // 2 + numel // NF4_BLOCK_SIZE + (numel // group) * e + 17 * e


def _nf4_layer_matrices(shape: ModelShape) -> list[int]:
    # What torchtune's lora_llama2(quantize_base=True) makes NF4 in each layer: the four attention
    # projections and the three MLP projections (the LM head and the embedding stay in the compute dtype).
    d, kv, i = shape.embed_dim, shape.kv_dim, shape.intermediate_dim
    return [d * d, d * kv, d * kv, d * d, d * i, i * d, d * i]


def _memory(
    shape: ModelShape,
    seq_len: int,
    batch_size: int,
    gpus: int,
    dtype: str,
    fp32_trainable_params: bool,
    trainable: int,
    total: int,
    checkpoint_layers: int,
    fsdp: bool,
    s2: bool,
    loss_chunks: int,
    lora_rank: int,
    lora_modules: Sequence[str],
    optimizer_state_dtype: str | None,
    activation_offloading: bool,
    cpu_offload: bool,
    quantize_base: bool = False,
    context_parallel_degree: int = 1,
    group_size: int | None = None,
    family: str | None = None,
    trainable_extras: Sequence[str] = ("embed", "norm"),
    linear_ce: bool = False,
    sequence_tile_tokens: int | None = None,
) -> tuple[dict[str, int], int]:
    e = _DTYPE_BYTES[dtype]
    shard = gpus if fsdp else 1
    lora = shape.lora_params(lora_rank, lora_modules)
    frozen = total - trainable
    # The recipe's fp32_trainable_params: the trainable tensors are fp32 master copies (FSDP2 casts them to
    # the compute dtype when it gathers them), their gradients are reduced into fp32 and AdamW's moments
    # follow the parameter dtype. Without it every parameter is in the compute dtype. Frozen weights always
    # are.
    trainable_e = _FP32 if fp32_trainable_params else e
    opt_e = _DTYPE_BYTES[optimizer_state_dtype] if optimizer_state_dtype else trainable_e
    # Context parallelism: each GPU keeps the activations of its slice only.
    act = activation_bytes(
        shape,
        -(-seq_len // context_parallel_degree),
        batch_size,
        dtype=dtype,
        s2=s2,
        activation_checkpointing=checkpoint_layers > 0,
        checkpoint_layers=checkpoint_layers,
        loss_chunks=loss_chunks,
        lora_rank=lora_rank,
        lora_modules=lora_modules,
        family=family,
        trainable_extras=trainable_extras,
        linear_ce=linear_ce,
        sequence_tile_tokens=sequence_tile_tokens,
    )
    # FSDP2 all-gathers one layer (in the compute dtype) while prefetching the next, and holds one layer's
    # unsharded gradients before the reduce-scatter.
    layer_full = e * (shape.layer_params() + lora // shape.num_layers)
    frozen_bytes = e * frozen
    nf4_transient = 0
    if quantize_base:
        # QLoRA: FSDP2 gathers the packed NF4 buffers, and each projection is dequantized to the compute
        # dtype only while it runs (one matrix at a time).
        matrices = _nf4_layer_matrices(shape)
        nf4_layer = sum(nf4_bytes(n, dtype) for n in matrices)
        layer_full = nf4_layer + e * (shape.layer_params() - sum(matrices) + lora // shape.num_layers)
        frozen_bytes = shape.num_layers * nf4_layer + e * (frozen - shape.num_layers * sum(matrices))
        nf4_transient = e * max(matrices)
    fsdp_buffers = 3 * layer_full if fsdp and gpus > 1 else 0
    # FSDP2's root unit (embeddings, final norm, LM head) is gathered for the forward and again for the
    # whole backward (its post-backward runs after the last layer's): one full copy in the compute dtype
    # through both phases. 0.5 GiB for Llama 2 7B, 2 GiB for Llama 3 8B's 128k vocabulary.
    root_gathered = e * shape.vocab_size * shape.embed_dim * (1 if shape.tie_word_embeddings else 2)
    root_gathered = root_gathered if fsdp and gpus > 1 else 0
    # fsdp_cpu_offload keeps the sharded parameters, gradients and optimizer state in host memory.
    resident = 0 if cpu_offload else 1
    # Activation offloading moves what the layers keep to host memory, with about two layers in flight
    # (the larger kind of layer when only some are checkpointed).
    largest_layer = (
        act.per_layer_saved if checkpoint_layers < shape.num_layers else act.layers_saved // shape.num_layers
    )
    layers_on_gpu = min(act.layers_saved, 2 * largest_layer) if activation_offloading else act.layers_saved
    memory = {
        "weights (frozen)": resident * frozen_bytes // shard,
        "trainable params": resident * trainable_e * trainable // shard,
        "gradients": resident * trainable_e * trainable // shard,
        "optimizer (AdamW)": resident * 2 * opt_e * trainable // shard,
        "fsdp buffers": (fsdp_buffers if not cpu_offload else max(fsdp_buffers, 3 * layer_full))
        + nf4_transient,
        "fsdp root gathered (embeddings, head)": root_gathered,
        "activations saved": layers_on_gpu + act.head_saved,
        (_LINEAR_CE_PHASE if linear_ce else _LOSS_PHASE): act.loss_phase,
        _LAYER_PHASE: act.recompute_transient
        + _seam_bytes(shape, batch_size, e, context_parallel_degree, group_size),
    }
    live = sum(memory.values()) - min(act.loss_phase, memory[_LAYER_PHASE])
    overhead = _CONTEXT_BYTES + int(_FRAGMENTATION * live)
    memory["overhead (context, fragmentation)"] = overhead
    return memory, live + overhead


def _seam_bytes(shape: ModelShape, batch_size: int, e: int, degree: int, group_size: int | None) -> int:
    """Transient bytes of one layer's context-parallel seam: the halo and the seam's keys and values.

    Unpacked batches need no mask there (a bottom-right causal SDPA); packed batches add a bool
    ``[b, G/2, G]`` seam mask and the bulk's ``[b, L, L]`` document mask, not counted here.
    """
    if degree <= 1 or not group_size:
        return 0
    # The seam runs on the heads straddling the slice start: at most the shifted ones (ceil(H/2)).
    heads = shifted_heads(shape.num_heads)
    seam_heads, half_group, d = heads.stop - heads.start, group_size // 2, shape.head_dim
    # Halo k+v received, the seam's concatenated k+v (G keys) and its output.
    return e * batch_size * seam_heads * d * (2 * half_group + 2 * group_size + half_group)


def plan(
    model: str | ModelShape,
    seq_len: int,
    *,
    gpus: int = 8,
    gpu_memory_gib: float = 80.0,
    batch_size: int = 1,
    dtype: str = "bf16",
    fp32_trainable_params: bool = True,
    activation_checkpointing: bool = True,
    checkpoint_layers: int | None = None,
    fsdp: bool = True,
    s2: bool = True,
    max_seq_len: int | None = None,
    group_size: int | None = None,
    group_size_ratio: float | None = 0.25,
    loss_chunks: int = 8,
    lora_rank: int = 8,
    lora_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
    trainable_extras: Sequence[str] = ("embed", "norm"),
    global_batch_size: int | None = None,
    optimizer_state_dtype: str | None = None,
    activation_offloading: bool = False,
    cpu_offload: bool = False,
    quantize_base: bool = False,
    context_parallel_degree: int = 1,
    family: str | None = None,
    linear_ce: bool = False,
    sequence_tile_tokens: int | None = None,
    suggest: bool = True,
) -> Plan:
    """Plan one LongLoRA training step per GPU.

    Args:
        model: A :data:`MODEL_SHAPES` name (Llama 2's ``"7b"``, ``"13b"``, ``"70b"``; ``"llama3_1_8b"``,
            ``"mistral_7b"``, ``"qwen2_5_7b"``, ...) or a :class:`ModelShape`.
        seq_len: Training length in tokens.
        gpus: Data-parallel GPUs (FSDP shards over all of them).
        gpu_memory_gib: Memory per GPU in GiB (an "80 GB" A100 has 80 GiB).
        batch_size: Micro-batch per GPU.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``: activations and frozen weights.
        fp32_trainable_params: The recipe's ``fp32_trainable_params``: with a bf16/fp16 ``dtype`` the
            trainable tensors, their gradients and AdamW state are fp32 (4 + 4 + 8 bytes per trainable
            parameter, sharded); False keeps them in ``dtype``.
        activation_checkpointing: Per-layer activation checkpointing.
        checkpoint_layers: The recipe's ``activation_checkpointing_layers``: with ``activation_checkpointing``
            only the first N decoder layers are checkpointed; None = all. Whatever it is, the plan also
            reports the peak for every N and the smallest N that fits (``checkpoint_suggestion``).
        fsdp: Shard parameters, gradients and optimizer state (FSDP2, as torchtune's distributed recipes).
        s2: S² attention (False = full attention).
        max_seq_len: The model's ``max_seq_len``, which sizes the S² group; default ``seq_len``. The
            recipe refuses a training length above it or not a multiple of the group size.
        group_size: S² group size (``model.s2_group_size``); default ``group_size_ratio * max_seq_len``.
        group_size_ratio: ``model.s2_group_size_ratio``, used when ``group_size`` is None.
        loss_chunks: Chunks of the loss.
        lora_rank: LoRA rank.
        lora_modules: Attention projections with LoRA.
        trainable_extras: The recipe's ``trainable_extras``: trained besides LoRA.
        global_batch_size: Sequences per optimizer step over all GPUs; when given, the gradient
            accumulation is computed (and checked) by the recipe's rule.
        optimizer_state_dtype: AdamW state dtype; default the trainable parameters' dtype.
        activation_offloading: torchtune's ``enable_activation_offloading`` (saved layer activations in
            host memory; needs activation checkpointing to pay off).
        cpu_offload: A what-if only: sharded parameters, gradients and optimizer state on the host
            (torchtune's ``fsdp_cpu_offload``; the ``longlora_distributed`` recipe has no such setting).
        quantize_base: QLoRA (``model.quantize_base``): the frozen attention and MLP projections are NF4
            (:func:`nf4_bytes`, about 0.516 bytes per weight); the LM head stays in ``dtype``.
        context_parallel_degree: The recipe's ``context_parallel_degree``: GPUs sharing each sequence
            (a divisor of ``gpus``); activations are per slice, the batch counts ``gpus / degree`` data
            replicas, and the attention traffic of the halo exchange (and of ring / all-to-all designs,
            for comparison) is reported.
        family: The model's family (``llama2``, ``llama3``, ``mistral``, ``qwen2``): its builder counts the
            parameters; None infers it from the model name or shape (:func:`model_family`).
        linear_ce: The recipe's ``loss`` is
        :class:`longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss`
            (no float32 log-probabilities kept for backward) instead of torchtune's
            ``CEWithChunkedOutputLoss``.
        sequence_tile_tokens: The recipe's ``sequence_tile_tokens``: every layer's MLP block runs over
            tiles of this many tokens (``longlora_tune.training.sequence_tiling``); None = off.
        suggest: Compute suggestions and the longest fitting length.

    Returns:
        The :class:`Plan`.

    Raises:
        ValueError: On an unknown model, dtype or a bad number, and with the recipe's or the model
            builder's message on settings they refuse (an S² group size that is not an even integer, a
            training length that is not a multiple of it, a ``global_batch_size`` that does not divide,
            a context-parallel degree the recipe refuses, a ``checkpoint_layers`` outside the model, a
            ``sequence_tile_tokens`` that is not a positive int).
    """
    from longlora_tune.config import validation as config_checks
    from longlora_tune.training.sequence_tiling import check_tile_tokens

    if isinstance(model, str):
        if model not in MODEL_SHAPES:
            raise ValueError(
                f"Unknown model {model!r}; choose one of {sorted(MODEL_SHAPES)} or pass a ModelShape"
            )
        name, shape = model, MODEL_SHAPES[model]
    elif isinstance(model, ModelShape):
        name, shape = "custom", model
    else:
        raise ValueError(f"model must be a name or a ModelShape, got {type(model).__name__}")
    family = model_family(model, family)
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    if optimizer_state_dtype is not None and optimizer_state_dtype not in _DTYPE_BYTES:
        raise ValueError(
            f"optimizer_state_dtype must be one of {sorted(_DTYPE_BYTES)}, got {optimizer_state_dtype!r}"
        )
    for label, value in (
        ("seq_len", seq_len),
        ("gpus", gpus),
        ("batch_size", batch_size),
        ("loss_chunks", loss_chunks),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib must be > 0, got {gpu_memory_gib}")
    check_tile_tokens(sequence_tile_tokens)
    max_seq_len = seq_len if max_seq_len is None else max_seq_len
    explicit_g = group_size is not None
    # The builder resolves the group size even for full attention, so a setting it refuses fails here too.
    resolved = _resolve_group_size(max_seq_len, group_size, group_size_ratio)
    group_size = resolved if s2 else None
    config_checks.check_training_length(seq_len, max_seq_len, group_size)
    degree = context_parallel_degree
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1 or gpus % degree:
        raise ValueError(f"context_parallel_degree={degree!r} must be a positive divisor of gpus={gpus}")
    if degree > 1 and not s2:
        raise ValueError(
            f"context_parallel_degree={degree} needs S2 attention (full attention would need ring attention)"
        )
    if degree > 1:
        from longlora_tune.modules.context_parallel import check_context_parallel  # torch

        check_context_parallel(seq_len, degree, group_size)
    data_parallel = gpus // degree
    grad_accum = (
        None
        if global_batch_size is None
        else config_checks.gradient_accumulation_steps(global_batch_size, batch_size, data_parallel)
    )
    trainable, total = parameter_counts(
        shape,
        lora_rank=lora_rank,
        lora_modules=lora_modules,
        trainable_extras=trainable_extras,
        family=family,
    )
    n_ckpt = checkpointed_layers(shape.num_layers, activation_checkpointing, checkpoint_layers)

    def peak_for(length: int, **overrides: Any) -> tuple[dict[str, int], int]:
        settings = dict(
            batch_size=batch_size,
            gpus=gpus,
            dtype=dtype,
            fp32_trainable_params=fp32_trainable_params,
            trainable=trainable,
            total=total,
            checkpoint_layers=n_ckpt,
            fsdp=fsdp,
            s2=s2,
            loss_chunks=loss_chunks,
            lora_rank=lora_rank,
            lora_modules=lora_modules,
            optimizer_state_dtype=optimizer_state_dtype,
            activation_offloading=activation_offloading,
            cpu_offload=cpu_offload,
            quantize_base=quantize_base,
            context_parallel_degree=degree,
            group_size=group_size,
            family=family,
            trainable_extras=trainable_extras,
            linear_ce=linear_ce,
            sequence_tile_tokens=sequence_tile_tokens,
        )
        settings.update(overrides)
        if group_size is not None and length != seq_len and group_size_ratio is not None and not explicit_g:
            # What-if lengths: the builder sizes the group from the length, as for the planned one.
            settings["group_size"] = int(group_size_ratio * length) // 2 * 2
        return _memory(shape, length, **settings)

    memory, peak = peak_for(seq_len)
    communication = _communication(
        shape, batch_size, seq_len, group_size, degree, _DTYPE_BYTES[dtype], n_ckpt
    )
    capacity = gpu_memory_gib * GIB
    flops_kwargs = dict(
        activation_checkpointing=n_ckpt > 0,
        checkpoint_layers=n_ckpt,
        lora_rank=lora_rank,
        lora_modules=lora_modules,
        trainable_extras=trainable_extras,
        sequence_tile_tokens=sequence_tile_tokens,
    )
    result = Plan(
        model=name,
        family=family,
        shape=shape,
        seq_len=seq_len,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        dtype=dtype,
        fp32_trainable_params=bool(fp32_trainable_params),
        activation_checkpointing=activation_checkpointing,
        fsdp=fsdp,
        s2=s2,
        group_size=group_size,
        loss_chunks=loss_chunks,
        linear_ce=bool(linear_ce),
        sequence_tile_tokens=sequence_tile_tokens,
        lora_rank=lora_rank,
        trainable_extras=tuple(trainable_extras),
        global_batch_size=global_batch_size,
        gradient_accumulation_steps=grad_accum,
        activation_offloading=activation_offloading,
        cpu_offload=cpu_offload,
        trainable_params=trainable,
        total_params=total,
        memory=memory,
        peak_bytes=peak,
        fits=peak <= capacity,
        flops=step_flops(shape, seq_len, batch_size, group_size=group_size, **flops_kwargs),
        flops_full_attention=step_flops(shape, seq_len, batch_size, group_size=None, **flops_kwargs),
        context_parallel_degree=degree,
        communication_per_layer={k: v // shape.num_layers for k, v in communication.items()},
        communication_per_step={k: v * (grad_accum or 1) for k, v in communication.items()},
        checkpoint_layers=n_ckpt,
    )
    # Memory-budgeted activation checkpointing: the peak for every N, and the smallest N that fits.
    result.checkpoint_layers_peak_bytes = [
        peak_for(seq_len, checkpoint_layers=n)[1] for n in range(shape.num_layers + 1)
    ]
    fitting = [n for n, p in enumerate(result.checkpoint_layers_peak_bytes) if p <= capacity]
    if fitting:
        k = fitting[0]
        every = step_flops(
            shape,
            seq_len,
            batch_size,
            group_size=group_size,
            **{**flops_kwargs, "activation_checkpointing": True, "checkpoint_layers": None},
        )
        some = step_flops(
            shape,
            seq_len,
            batch_size,
            group_size=group_size,
            **{**flops_kwargs, "activation_checkpointing": k > 0, "checkpoint_layers": k},
        )
        saved = every.total - some.total
        result.checkpoint_suggestion = {
            "layers": k,
            "peak_bytes": result.checkpoint_layers_peak_bytes[k],
            "flops_saved_vs_all": saved,
            "fraction_of_step_saved_vs_all": saved / every.total,
        }
    if not suggest:
        return result

    def longest(**overrides: Any) -> int:
        # Whole 1024-token slices per context-parallel rank.
        unit = 1024 * overrides.get("context_parallel_degree", degree)
        lo, hi = 0, max(seq_len, 1024) * 64 // unit
        while lo < hi:  # activation memory grows monotonically with length
            mid = (lo + hi + 1) // 2
            if peak_for(mid * unit, **overrides)[1] <= capacity:
                lo = mid
            else:
                hi = mid - 1
        return lo * unit

    result.max_seq_len_fitting = longest()
    if result.fits:
        return result
    candidates: list[tuple[str, dict[str, Any]]] = []
    if n_ckpt < shape.num_layers:
        text = "enable_activation_checkpointing=True" if not n_ckpt else "activation_checkpointing_layers=all"
        candidates.append((text, {"checkpoint_layers": shape.num_layers}))
    if not fsdp and gpus > 1:
        candidates.append(("shard with FSDP (torchtune distributed recipe)", {"fsdp": True}))
    if batch_size > 1:
        # The recipe derives the accumulation from global_batch_size; say what it becomes.
        accumulation = (
            f"gradient accumulation {config_checks.gradient_accumulation_steps(global_batch_size, 1, gpus)} "
            f"(global_batch_size {global_batch_size} unchanged)"
            if global_batch_size is not None
            else f"{batch_size}x the gradient accumulation steps"
        )
        candidates.append((f"batch_size=1 with {accumulation}", {"batch_size": 1}))
    if dtype == "fp32":
        candidates.append(("dtype=bf16", {"dtype": "bf16"}))
    if not activation_offloading:
        candidates.append(
            ("enable_activation_offloading=True (host RAM, PCIe traffic)", {"activation_offloading": True})
        )
    if not quantize_base:
        candidates.append(("model.quantize_base=true (QLoRA: NF4 base weights)", {"quantize_base": True}))
    if sequence_tile_tokens is None:
        candidates.append(
            (
                f"sequence_tile_tokens={SUGGESTED_TILE_TOKENS} (each MLP block over tiles of tokens)",
                {"sequence_tile_tokens": SUGGESTED_TILE_TOKENS},
            )
        )
    # No fsdp_cpu_offload suggestion: the recipe has no such setting (cpu_offload stays a what-if).
    combined: dict[str, Any] = {}
    for text, override in candidates:
        combined.update(override)
        fits_alone = peak_for(seq_len, **override)[1] <= capacity
        result.suggestions.append(f"{text}: {'fits' if fits_alone else 'not enough alone'}")
    if combined and len(candidates) > 1:
        _, peak_all = peak_for(seq_len, **combined)
        result.suggestions.append(
            f"all of the above together: peak {peak_all / GIB:.1f} GiB "
            f"({'fits' if peak_all <= capacity else 'still too big'})"
        )
    reach = longest(**combined)
    result.suggestions.append(
        f"longest length that fits{' with the changes above' if combined else ''}: "
        + (f"{reach} tokens" if reach else "none")
    )
    if s2:
        # Context parallelism divides the activations instead (the smallest degree that fits alone).
        for more in range(degree + 1, gpus + 1):
            if gpus % more or seq_len % more or (seq_len // more) % (group_size // 2):
                continue
            if peak_for(seq_len, context_parallel_degree=more)[1] <= capacity:
                result.suggestions.append(f"context_parallel_degree={more}: fits")
                break
    return result


def _communication(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    group_size: int | None,
    degree: int,
    dtype_bytes: int,
    recomputed_layers: int,
) -> dict[str, int]:
    """Bytes one GPU receives per micro-batch over all layers: the halo design, ring and all-to-all.

    A recomputed (checkpointed) layer receives its forward traffic twice.
    """
    if degree <= 1 or group_size is None:
        return {}
    common = dict(batch_size=batch_size, head_dim=shape.head_dim, degree=degree, dtype_bytes=dtype_bytes)
    slice_len = seq_len // degree

    def per_layer(recompute: bool) -> dict[str, int]:
        return {
            "halo": halo_bytes_per_layer(
                num_heads=shape.num_heads, group_size=group_size, recompute=recompute, **common
            ),
            "ring": ring_bytes_per_layer(
                num_kv_heads=shape.num_kv_heads, slice_len=slice_len, recompute=recompute, **common
            ),
            "ulysses": ulysses_bytes_per_layer(
                num_heads=shape.num_heads,
                num_kv_heads=shape.num_kv_heads,
                slice_len=slice_len,
                recompute=recompute,
                **common,
            ),
        }

    again, once = per_layer(True), per_layer(False)
    kept = shape.num_layers - recomputed_layers
    return {k: recomputed_layers * again[k] + kept * once[k] for k in again}


# ----------------------------------------------------------------------------------------------------
# Configs and CLI
# ----------------------------------------------------------------------------------------------------

# Llama 2's published shapes are named by size alone; every other sized builder longlora_<key> has
# MODEL_SHAPES[<key>].
_LLAMA2_SIZED = {"llama2_7b": "7b", "llama2_13b": "13b", "llama2_70b": "70b"}


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    from longlora_tune import resources

    shipped = resources.configs_dir()
    candidate = shipped / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped.is_dir() else []
    raise ValueError(f"Config {name!r} not found: pass a YAML path or one of {available}")


def load_config_settings(name: str) -> dict[str, Any]:
    """Planner arguments read from a shipped config name or a YAML file.

    Reads ``model`` (a sized builder such as ``longlora_llama3_1_8b`` with ``max_seq_len``, a family's
    component builder -- ``longlora_llama2``, ``longlora_llama3``, ``longlora_mistral``, ``longlora_qwen2`` --
    with explicit sizes, or no ``_component_``: the builder and sizes of ``checkpoint_dir``), the
    training length as the recipe reads it (``dataset.block_size``, ``dataset.max_seq_len`` or
    ``tokenizer.max_seq_len``; ``model.max_seq_len`` when none is set), ``batch_size``,
    ``global_batch_size``, ``dtype``, ``fp32_trainable_params``, ``trainable_extras``,
    ``enable_activation_checkpointing``, ``activation_checkpointing_layers``, ``sequence_tile_tokens``, the
    ``loss`` (its ``num_output_chunks``, and whether it is ``ChunkedLinearCrossEntropyLoss``) and the S²
    group settings.

    Args:
        name: Config name in ``configs/`` (without ``.yaml``) or a path.

    Returns:
        Keyword arguments for :func:`plan` (``model``, ``seq_len`` and ``max_seq_len`` included).

    Raises:
        ValueError: If the config is missing or its model section cannot be read.
    """
    from omegaconf import OmegaConf  # torchtune's config library; only the CLI needs it

    from longlora_tune.config import validation as config_checks

    raw = OmegaConf.load(_config_path(name))
    cfg = OmegaConf.to_container(raw, resolve=True)
    model = cfg.get("model") or {}
    if "_component_" not in model:
        # The hf_checkpoint config: the builder and shapes are the checkpoint folder's.
        folder = Path(str(cfg.get("checkpoint_dir")))
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"Config {name!r}: model has no _component_, so its builder comes from checkpoint_dir, and "
                f"{folder / 'config.json'} does not exist; set checkpoint_dir in a copy of the config"
            )
        from longlora_tune.hf.base import HFBaseModel

        model = HFBaseModel.read(folder).model_section(model)
    component = model.get("_component_", "")
    if "max_seq_len" not in model:
        raise ValueError(
            f"Config {name!r}: model.max_seq_len is missing; the planner needs the model's length"
        )
    # The recipe's rule; the recipe requires both data sections, a planner config may omit them.
    for key in ("dataset", "tokenizer"):
        if raw.get(key) is None:
            raw[key] = {}
    train_len = config_checks.training_length(raw)
    settings: dict[str, Any] = {
        "max_seq_len": int(model["max_seq_len"]),
        "seq_len": int(model["max_seq_len"]) if train_len is None else train_len,
    }
    settings["model"], settings["family"] = _config_model(name, component, model)
    if model.get("use_full_attn"):
        settings["s2"] = False
    if model.get("s2_group_size"):
        settings["group_size"] = int(model["s2_group_size"])
    elif model.get("s2_group_size_ratio"):
        settings["group_size_ratio"] = float(model["s2_group_size_ratio"])
    if "lora_rank" in model:
        settings["lora_rank"] = int(model["lora_rank"])
    if "lora_attn_modules" in model:
        settings["lora_modules"] = tuple(model["lora_attn_modules"])
    if "trainable_extras" in cfg:
        settings["trainable_extras"] = tuple(cfg["trainable_extras"] or ())
    if "batch_size" in cfg:
        settings["batch_size"] = int(cfg["batch_size"])
    if cfg.get("global_batch_size") is not None:
        settings["global_batch_size"] = int(cfg["global_batch_size"])
    if cfg.get("dtype") in _DTYPE_BYTES:
        settings["dtype"] = cfg["dtype"]
    if "fp32_trainable_params" in cfg:
        settings["fp32_trainable_params"] = bool(cfg["fp32_trainable_params"])
    if "enable_activation_checkpointing" in cfg:
        settings["activation_checkpointing"] = bool(cfg["enable_activation_checkpointing"])
    layers = cfg.get("activation_checkpointing_layers", "all")
    if layers != "all":
        settings["checkpoint_layers"] = _checkpoint_layers_arg(layers)
    if cfg.get("sequence_tile_tokens") is not None:
        settings["sequence_tile_tokens"] = cfg["sequence_tile_tokens"]
    if model.get("quantize_base"):
        settings["quantize_base"] = True
    if "enable_activation_offloading" in cfg:
        settings["activation_offloading"] = bool(cfg["enable_activation_offloading"])
    if cfg.get("context_parallel_degree") is not None:
        settings["context_parallel_degree"] = int(cfg["context_parallel_degree"])
    # fsdp_cpu_offload is not read: longlora_distributed ignores the key, so the run would not offload.
    loss = cfg.get("loss") or {}
    loss_component = str(loss.get("_component_", ""))
    if "ChunkedOutput" in loss_component or "ChunkedLinearCrossEntropy" in loss_component:
        settings["loss_chunks"] = int(loss.get("num_output_chunks", 8))
        settings["linear_ce"] = "ChunkedLinearCrossEntropy" in loss_component
    elif loss:
        settings["loss_chunks"] = 1
    return settings


def _config_model(name: str, component: str, model: dict[str, Any]) -> tuple[str | ModelShape, str]:
    """The planned model and its family from a config's ``model`` section."""
    from longlora_tune.models.families import family_of_builder

    family = family_of_builder(component)
    if family is None:
        raise ValueError(
            f"Config {name!r}: model._component_ {component!r} is not a longlora_tune.models builder "
            "(longlora_llama2, longlora_llama3, longlora_mistral, longlora_qwen2 or a sized one)"
        )
    builder = component.rsplit(".", 1)[-1]
    if builder != family.builder.rsplit(".", 1)[-1]:
        key = builder.removeprefix("longlora_")
        key = _LLAMA2_SIZED.get(key, key)
        if key not in MODEL_SHAPES:
            raise ValueError(f"Config {name!r}: no published shape for model._component_ {component!r}")
        return key, family.name
    missing = [f for f in _SIZE_FIELDS[:5] if f not in model]
    intermediate = model.get("intermediate_dim")
    if intermediate is None and family.name in ("llama2", "llama3"):
        # The builders' default SwiGLU width (torchtune's scale_hidden_dim_for_mlp of each family).
        embed = int(model.get("embed_dim", 0))
        intermediate = _llama2_intermediate(embed) if family.name == "llama2" else _llama3_intermediate(embed)
    elif intermediate is None:
        missing.append("intermediate_dim")
    if missing:
        raise ValueError(f"Config {name!r}: {builder} needs model.{', model.'.join(missing)}")
    sizes = [int(model[f]) for f in _SIZE_FIELDS[:5]] + [int(intermediate)]
    tied = bool(model.get("tie_word_embeddings", False))
    if not (tied or family.qkv_bias):
        return ModelShape(*sizes), family.name
    return FamilyShape(*sizes, tie_word_embeddings=tied, qkv_bias=family.qkv_bias), family.name


def _llama3_intermediate(embed_dim: int) -> int:
    # torchtune's Llama 3 rule (used by lora_llama3_2 when intermediate_dim is None): 4 * int(2d/3) rounded
    # up to a multiple of 256. Published Llama 3 shapes state theirs (14336 for 4096).
    return 256 * ((4 * int(2 * embed_dim / 3) + 255) // 256)


def _checkpoint_layers_arg(value: Any) -> int | None:
    """``activation_checkpointing_layers`` / ``--checkpoint-layers``: ``all`` (None) or an int >= 0."""
    if value is None or value == "all":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if isinstance(value, bool) or count < 0 or str(count) != str(value).strip():
        raise ValueError(f"activation_checkpointing_layers={value!r} must be all or an integer >= 0")
    return count


def _tile_tokens_arg(value: str) -> int | str | None:
    """``--sequence-tile-tokens``: ``off`` is None, a whole number an int; anything else is left for
    :func:`plan` to refuse with the recipe's message."""
    if value == "off":
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _llama2_intermediate(embed_dim: int) -> int:
    # Llama 2's SwiGLU width rule: 2/3 of 4*d rounded up to a multiple of 256 (11008 for 4096).
    hidden = int(8 * embed_dim / 3)
    return 256 * ((hidden + 255) // 256)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m longlora_tune.plan",
        description="Estimate per-GPU memory and FLOPs of a LongLoRA training step and whether it fits.",
        epilog="Exit status: 0 fits, 1 does not fit, 2 usage or config error.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="shipped config name (e.g. llama2_7b_100k) or a YAML path")
    source.add_argument("--model", choices=sorted(MODEL_SHAPES), help="model size (with --seq-len)")
    parser.add_argument(
        "--seq-len",
        type=int,
        help="training length (required with --model); with --config it replaces both the training length "
        "and model.max_seq_len",
    )
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--batch-size", type=int, help="micro-batch per GPU (default: config or 1)")
    parser.add_argument(
        "--global-batch-size",
        type=int,
        help="sequences per optimizer step over all GPUs (default: config; none with --model)",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), help="default: config or bf16")
    parser.add_argument(
        "--fp32-trainable-params",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fp32 master copies of the trainable tensors, their gradients and AdamW state "
        "(default: config or on, as the recipe)",
    )
    parser.add_argument("--group-size", type=int, help="S2 group size (default: config or 1/4 of the length)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--checkpoint-layers",
        metavar="N|all",
        help="checkpoint only the first N decoder layers (the recipe's activation_checkpointing_layers; "
        "default: config or all); the plan also suggests the smallest N that fits",
    )
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--activation-offloading", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--cpu-offload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="what-if: parameters, gradients and optimizer state on the host (torchtune's fsdp_cpu_offload; "
        "longlora_distributed has no such setting)",
    )
    parser.add_argument(
        "--quantize-base",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="QLoRA: NF4 frozen base projections (default: config's model.quantize_base or off)",
    )
    parser.add_argument("--full-attn", action="store_true", help="plan full attention instead of S2")
    parser.add_argument(
        "--context-parallel",
        type=int,
        help="GPUs sharing each sequence (the recipe's context_parallel_degree; default: config or 1)",
    )
    parser.add_argument("--loss-chunks", type=int, help="chunks of the loss (default: config or 8)")
    parser.add_argument(
        "--sequence-tile-tokens",
        metavar="N|off",
        help="run each layer's MLP block over tiles of N tokens (the recipe's sequence_tile_tokens; default: "
        "config or off)",
    )
    parser.add_argument(
        "--linear-ce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss, which keeps no fp32 "
        "log-probs "
        "for backward (default: the config's loss, else torchtune's CEWithChunkedOutputLoss)",
    )
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON to PATH (or stdout)")
    args = parser.parse_args(argv)
    if args.model and args.seq_len is None:
        parser.error("--model needs --seq-len")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 when the plan fits, 1 when it does not, 2 on a usage error.
    """
    args = _parse_args(argv)
    try:
        settings = load_config_settings(args.config) if args.config else {"model": args.model}
        if args.seq_len is not None:
            # A what-if at another length: the model is built for it too (its group size follows).
            settings.pop("max_seq_len", None)
        for key, value in (
            ("seq_len", args.seq_len),
            ("batch_size", args.batch_size),
            ("global_batch_size", args.global_batch_size),
            ("group_size", args.group_size),
            ("dtype", args.dtype),
            ("fp32_trainable_params", args.fp32_trainable_params),
            ("activation_checkpointing", args.activation_checkpointing),
            ("checkpoint_layers", _checkpoint_layers_arg(args.checkpoint_layers)),
            ("loss_chunks", args.loss_chunks),
            ("linear_ce", args.linear_ce),
            ("activation_offloading", args.activation_offloading),
            ("cpu_offload", args.cpu_offload),
            ("quantize_base", args.quantize_base),
            ("context_parallel_degree", args.context_parallel),
        ):
            if value is not None:
                settings[key] = value
        if args.sequence_tile_tokens is not None:
            settings["sequence_tile_tokens"] = _tile_tokens_arg(args.sequence_tile_tokens)
        if args.full_attn:
            settings["s2"] = False
        result = plan(gpus=args.gpus, gpu_memory_gib=args.gpu_memory, fsdp=args.fsdp, **settings)
    except ValueError as err:
        print(f"longlora_tune.plan: error: {err}", file=sys.stderr)
        return 2
    if args.config:
        result.model = Path(args.config).stem
    if args.json == "-":
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result.table())
        if args.json:
            atomic_write_json(args.json, result.to_dict(), default=str)
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
