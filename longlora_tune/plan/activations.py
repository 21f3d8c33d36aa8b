"""Activation memory of one micro-batch: what autograd keeps per layer, the loss and the backward phases.

The activation model is written for the code this project actually runs: torchtune's LoRA Llama 2
(``TransformerSelfAttentionLayer``: RMSNorm computed in float32, LoRA on q/k/v/o with frozen base weights,
SwiGLU MLP, trainable embeddings and norms; the norms and the MLP product in the lean forms of
:mod:`longlora_tune.modules.lean_layers`) with our S² attention callable and torchtune's
``CEWithChunkedOutputLoss`` (or our ``ChunkedLinearCrossEntropyLoss``). Every term is the storage that
autograd keeps for backward, counted once per storage (tensors that share a storage are not double
counted). ``tests/test_plan.py`` checks the model against the bytes that
``torch.autograd.graph.saved_tensors_hooks`` sees and the transient phases against what the ops allocate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from longlora_tune.models.shapes import ModelShape
from longlora_tune.modules.s2_heads import shifted_heads
from longlora_tune.plan.facts import (
    DTYPE_BYTES,
    FP32_BYTES,
    INT64_BYTES,
    checkpointed_layers,
    rotates_pairs,
    tied_head_trained,
)
from longlora_tune.plan.flops import s2_segment_lengths

__all__ = ["ActivationEstimate", "activation_bytes", "tile_backward_bytes"]

#: The projections inside a tiled layer's attention prefix (recomputed tile by tile in backward).
_PREFIX_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


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
            sequence tiling, one tile's rebuilt MLP block and its gradients instead of the whole MLP's, and
            with every layer checkpointed the measured peak of a tiled layer's recompute and backward.
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

    The peak is in the SwiGLU product's backward: the tile's rebuilt gate and up projections, the gradient
    of the down projection's input and the gradients of the two factors (five ``intermediate_dim`` tensors
    at once), one hidden-sized tensor of the tile and three float32 per-token values (the lean norm's
    inverse RMS and its reductions, :mod:`longlora_tune.modules.lean_layers`). Measured against the ops'
    allocations in ``tests/test_plan.py``.

    Args:
        shape: Model sizes.
        tile_tokens: Tokens in the tile.
        dtype: Compute dtype.

    Returns:
        The bytes.
    """
    e = DTYPE_BYTES[dtype]
    d, i, t = shape.embed_dim, shape.intermediate_dim, tile_tokens
    return e * t * d + 5 * e * t * i + 3 * FP32_BYTES * t


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

    Per layer, autograd keeps: for each of the two RMSNorms its input (in the compute dtype) and the float32
    inverse RMS (:class:`~longlora_tune.modules.lean_layers.LeanRMSNorm`); the normed hidden state that the
    LoRA A matrices read; each LoRA B input (``rank`` wide); q, k, v (keys and values already expanded to all
    heads) and the attention output plus a float32 log-sum-exp per head and token; with S² also the output
    re-assembled from the groups (full attention's output is laid out so that the output projection reads it
    in place); and two ``intermediate_dim`` tensors of the SwiGLU MLP, the gate and up projections (the SiLU
    is recomputed in backward). The frozen projections keep only their weights. A checkpointed layer keeps
    just its input. The head keeps the final norm's two tensors, the int64 token ids and labels (no labels
    with ``linear_ce``), and the loss keeps float32 log-probabilities for every token (chunking the loss
    bounds only the float32 upcast, not what backward keeps).

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

    With ``sequence_tile_tokens`` T (:mod:`longlora_tune.training.sequence_tiling`) a layer's attention
    prefix (first norm, q/k/v with their LoRA, RoPE) keeps only the layer input, its MLP block (the second
    norm and the SwiGLU MLP) only its input, and the final norm only its input; the MLP's backward holds one
    tile of ``min(T, batch x seq_len)`` tokens at a time (:func:`tile_backward_bytes`). With every layer
    checkpointed the layer-backward phase is then the larger of two measured moments (see the code): the
    end of the rebuilt layer's recompute at its output projection, and the MLP tiles' backward.

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
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    n_ckpt = checkpointed_layers(shape.num_layers, activation_checkpointing, checkpoint_layers)
    if seq_len < 1 or batch_size < 1 or loss_chunks < 1:
        raise ValueError(
            f"seq_len, batch_size and loss_chunks must be >= 1, got {seq_len}, {batch_size}, {loss_chunks}"
        )
    e = DTYPE_BYTES[dtype]
    t = batch_size * seq_len
    d, i, v = shape.embed_dim, shape.intermediate_dim, shape.vocab_size
    hidden = t * d
    norm = e * hidden + FP32_BYTES * t
    lora = e * hidden + len(lora_modules) * e * t * lora_rank
    attention = 4 * e * hidden + FP32_BYTES * t * shape.num_heads + (e * hidden if s2 else 0)
    mlp = 2 * e * t * i
    rope = 0 if rotates_pairs(shape, family) else 4 * e * seq_len * shape.head_dim
    tiled = sequence_tile_tokens is not None
    if tiled:
        # The attention prefix (first norm, q/k/v with LoRA, RoPE) keeps only the layer input and the MLP
        # block only its input; what stays is attention's own (and the output projection's LoRA B input).
        outside = [m for m in lora_modules if m not in _PREFIX_PROJECTIONS]
        attention_kept = attention + len(outside) * e * t * lora_rank
        per_layer = e * hidden + attention_kept + e * hidden
    else:
        per_layer = 2 * norm + lora + attention + mlp + rope
    layers_saved = n_ckpt * e * hidden + (shape.num_layers - n_ckpt) * per_layer
    tied = tied_head_trained(shape, trainable_extras)
    # Tiled, the final norm keeps its input only (no inverse RMS over all tokens).
    final_norm = e * hidden if tiled else norm
    # The fused loss computes its gradients in forward: it keeps no labels and no tied head input.
    ids = (1 if linear_ce else 2) * INT64_BYTES * t
    head_saved = final_norm + ids + (e * hidden if tied and not linear_ce else 0)
    loss_saved = e * hidden + (e * v * d if tied else 0) if linear_ce else FP32_BYTES * t * v
    # Backward of one layer kept whole, measured (tests/test_plan.py): the larger of two moments. In the
    # SwiGLU product's backward three MLP-wide gradients and one hidden-sized one are alive; in attention's
    # backward, hidden-sized gradients of the layer's input and output, of the attention output in and out
    # of the S² layout, dq/dk/dv and their re-laid-out copies (seven, eight without GQA), plus in a
    # low-precision dtype the first norm's float32 copies of its input and gradient, and float32 values
    # per token and head. A checkpointed layer's own activations are rebuilt first; its peak is then in
    # the MLP's backward, or in attention's once the MLP and its norm have freed theirs. Backward runs from
    # the last layer to the first, so with the first N < all layers checkpointed the kept layers have freed
    # at least one layer's activations before the first recompute: the rebuilt layer only adds to the peak
    # when all are. Tiled, one tile's rebuilt MLP block and its gradients replace the MLP-wide gradients.
    mlp_phase = 3 * e * t * i
    dense_kv = 1 if shape.num_kv_heads == shape.num_heads else 0
    attention_phase = (
        (7 + dense_kv) * e * hidden
        + (2 * FP32_BYTES * hidden if e != FP32_BYTES else 0)
        + FP32_BYTES * t * (shape.num_heads + 2)  # attention's per-head row sums, the norm's reductions
    )
    tile = tile_backward_bytes(shape, min(sequence_tile_tokens, t), dtype) if tiled else 0
    if tiled:
        grads = 5 * e * hidden + tile
    else:
        grads = max(mlp_phase + e * hidden, attention_phase)
    if n_ckpt < shape.num_layers:
        recompute_transient = grads
    elif tiled:
        # Measured (tests/test_plan.py): a tiled layer's rebuilt tensors are attention's (its input is the
        # checkpoint's), and its peak is the larger of two moments, with the incoming gradient alive: the
        # end of the recompute, where the output projection holds its input, its frozen and LoRA outputs
        # and their scaled sum; and the MLP tiles' backward, with the MLP block's input, the gradient it
        # fills and one tile.
        recompute_transient = e * hidden + attention_kept + max(4 * e * hidden, 2 * e * hidden + tile)
    else:
        recompute_transient = per_layer + max(mlp_phase, attention_phase - mlp - norm)
    if linear_ce:
        # One chunk's fp32 logits with their compute-dtype copy (the matmul's output, or the gradient cast
        # for the backward matmuls; none in fp32); the final norm's output, the op's input, is alive
        # throughout. A trained tied head adds its fp32 weight-gradient accumulator and each chunk's fp32
        # contribution (in fp32 the accumulator is the gradient kept, counted in loss_saved).
        chunk = -(-t // loss_chunks)
        low = e if e != FP32_BYTES else 0
        accumulators = (FP32_BYTES + (FP32_BYTES if low else 0)) * v * d if tied else 0
        logits_transient = (FP32_BYTES + low) * chunk * v + e * hidden + accumulators
    else:
        logits_transient = e * t * v + 2 * FP32_BYTES * t * v // loss_chunks + (2 * e * v * d if tied else 0)
    return ActivationEstimate(
        per_layer, layers_saved, head_saved, loss_saved, recompute_transient, logits_transient
    )


def _attention_pieces(seq_len: int, group_size: int | None, num_heads: int) -> list[float]:
    """The fractions of attention's saved tensors one S² call per segment length keeps (``[1.0]`` dense)."""
    if group_size is None or group_size >= seq_len:
        return [1.0]
    shifted = shifted_heads(num_heads)
    heads = (shifted.start, shifted.stop - shifted.start)
    tokens: dict[int, int] = {}
    for n_heads, segments in zip(heads, s2_segment_lengths(seq_len, group_size)):
        for length in segments:
            tokens[length] = tokens.get(length, 0) + length * n_heads
    return [n / (seq_len * num_heads) for _, n in sorted(tokens.items(), reverse=True)]


def offloaded_tensor_bytes(
    shape: ModelShape,
    seq_len: int,
    batch_size: int = 1,
    *,
    dtype: str = "bf16",
    checkpoint_layers: int,
    lora_rank: int = 8,
    lora_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
    family: str | None = None,
    sequence_tile_tokens: int | None = None,
    group_size: int | None = None,
) -> list[int]:
    """Bytes of each tensor torchtune's ``OffloadActivations`` copies to host memory in one forward.

    As the recipe uses it (``training.get_act_offloading_ctx_manager`` around the model's forward, the LM
    head ``model.output`` excluded): every tensor an op saves for backward inside the forward, once per
    save (the context does not share a storage saved twice), when it has at least 1024 bytes and is not a
    ``Parameter`` object itself -- so views of the frozen weights and of the RoPE cache are copied too.
    The loss runs outside the context (``CEWithChunkedOutputLoss``) or keeps its gradients on its autograd
    context rather than saving them (``ChunkedLinearCrossEntropyLoss``), so neither is offloaded.

    Per forward: the token ids (embedding); a checkpointed layer's input; a layer that keeps its activations:
    each RMSNorm's input and inverse RMS, per LoRA projection its input and its B input, the frozen
    projections' and LoRA matrices' weights, RoPE's cos/sin views for q and k (four each), the attention's q,
    k, v, output and float32 log-sum-exp, the output projection's input and the SwiGLU gate and up
    projections; the final norm as a layer's norm. Tiled, the attention prefix (first norm, q/k/v, RoPE), the
    MLP block and the final norm each save their input only. Checked against the pack calls in
    ``tests/test_plan.py``.

    Args:
        shape: Model sizes.
        seq_len: Tokens per sequence.
        batch_size: Sequences per micro-batch.
        dtype: Compute dtype.
        checkpoint_layers: The first N decoder layers checkpointed.
        lora_rank: LoRA rank.
        lora_modules: Attention projections with LoRA.
        family: The model's family (:func:`~longlora_tune.plan.facts.model_family`).
        sequence_tile_tokens: Tokens per MLP tile (None: not tiled).
        group_size: S² group size (None: full attention). S² attends all segments of one length in one call
            (the full groups of both head sets, then the shifted heads' half groups), so attention's saved
            tensors come in one piece per segment length: 7/8 and 1/8 of the whole at ``G = N/4``. The
            pieces matter for the pinned allocator's power-of-two blocks, not for the total.

    Returns:
        One entry per copied tensor, in bytes.
    """
    e = DTYPE_BYTES[dtype]
    t = batch_size * seq_len
    d, kv, i, r = shape.embed_dim, shape.kv_dim, shape.intermediate_dim, lora_rank
    hidden = e * t * d

    def norm() -> list[int]:
        return [hidden, FP32_BYTES * t]

    projections = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "output_proj": (d, d)}
    tiled = sequence_tile_tokens is not None
    # Tiled, the attention prefix (first norm, q/k/v, RoPE) saves the layer input only.
    kept = [hidden] if tiled else norm()
    for name, (fan_in, fan_out) in projections.items():
        if tiled and name in _PREFIX_PROJECTIONS:
            continue
        kept.append(e * fan_in * fan_out)  # the frozen weight, for the input gradient
        if name in lora_modules:
            # LoRA A's input is the normed hidden state (for q/k/v) or the attention output (counted below).
            kept += [e * r * fan_in, e * fan_out * r, e * t * r] + ([hidden] if name != "output_proj" else [])
    kept.append(hidden)  # the output projection's input (the attention output re-assembled)
    # RoPE's cos/sin as float32 views of the cache, four for q and four for k; Qwen2 keeps its cast copies.
    if not tiled:
        kept += (
            [FP32_BYTES * seq_len * shape.head_dim // 2] * 8
            if rotates_pairs(shape, family)
            else [e * seq_len * shape.head_dim] * 4
        )
    pieces = _attention_pieces(seq_len, group_size, shape.num_heads)
    kept += [int(hidden * f) for f in pieces] * 4 + [
        int(FP32_BYTES * t * shape.num_heads * f) for f in pieces
    ]
    kept += [hidden] if tiled else norm() + [e * t * i] * 2 + [e * d * i] * 3
    n_kept = shape.num_layers - checkpoint_layers
    final_norm = [hidden] if tiled else norm()
    tensors = [INT64_BYTES * t] + [hidden] * checkpoint_layers + kept * n_kept + final_norm
    return [b for b in tensors if b >= 1024]


def pinned_bytes(tensor_bytes: Sequence[int]) -> int:
    """Host memory the tensors take in torch's pinned (page-locked) caching allocator.

    The allocator rounds every block up to a power of two (``CachingHostAllocator``, the default
    ``pinned_max_round_threshold``) and keeps freed blocks for the next step, so the host needs the
    rounded sum.

    Args:
        tensor_bytes: Bytes of each tensor.

    Returns:
        The rounded total.
    """
    return sum(1 << (b - 1).bit_length() for b in tensor_bytes)
