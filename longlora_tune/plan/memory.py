"""Per-GPU memory of one training step: parameters, gradients, optimizer state, FSDP buffers, activations.

Parameters, gradients and AdamW state follow the recipe's ``fp32_trainable_params`` (default true): in a
bf16 run the trainable tensors (LoRA, embeddings, norms) are fp32 master copies, so they, their gradients
(FSDP2 reduces in fp32) and AdamW's two moments take 4 + 4 + 8 bytes per trainable parameter, sharded over
the GPUs, while the frozen base weights stay in the compute dtype (or NF4 with QLoRA, :func:`nf4_bytes`).
The trainable set is :func:`longlora_tune.models.trainable.trainable_param_names` on the model the builder
makes (on the meta device). Activations are :func:`longlora_tune.plan.activations.activation_bytes`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

from longlora_tune.models.shapes import _SIZE_FIELDS, ModelShape
from longlora_tune.modules.s2_heads import shifted_heads
from longlora_tune.plan.activations import activation_bytes, offloaded_tensor_bytes, pinned_bytes
from longlora_tune.plan.facts import DTYPE_BYTES, FP32_BYTES, GIB, model_family

__all__ = [
    "LAYER_PHASE",
    "LINEAR_CE_PHASE",
    "LOSS_PHASE",
    "NF4_BLOCK_SIZE",
    "NF4_SCALER_BLOCK_SIZE",
    "StepMemory",
    "memory_per_gpu",
    "nf4_bytes",
    "parameter_counts",
    "quantizable",
]

#: CUDA context, cuBLAS and NCCL workspaces: resident on the GPU but outside the caching allocator.
_CONTEXT_BYTES = int(1.5 * GIB)
#: Caching-allocator fragmentation on top of the bytes live at the peak.
_FRAGMENTATION = 0.05
# The two phases of a step that do not overlap: only the larger one adds to the peak.
LOSS_PHASE = "loss phase: fp32 log-probs + logits (*)"
LINEAR_CE_PHASE = "loss phase: one chunk's logits + hidden-state gradient (*)"
LAYER_PHASE = "layer backward phase: recompute + grads (*)"


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
    e = DTYPE_BYTES[dtype]
    return numel // 2 + numel // NF4_BLOCK_SIZE + (numel // group) * e + 17 * e


def quantizable(shape: ModelShape) -> bool:
    """Whether torchao can hold the model's layer matrices in NF4 (whole scale groups), i.e. QLoRA applies.

    Args:
        shape: Model sizes.

    Returns:
        True when every NF4 matrix of a layer is a positive multiple of the scale group.
    """
    group = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    return all(n > 0 and n % group == 0 for n in _nf4_layer_matrices(shape))


def _nf4_layer_matrices(shape: ModelShape) -> list[int]:
    # What torchtune's lora_llama2(quantize_base=True) makes NF4 in each layer: the four attention
    # projections and the three MLP projections (the LM head and the embedding stay in the compute dtype).
    d, kv, i = shape.embed_dim, shape.kv_dim, shape.intermediate_dim
    return [d * d, d * kv, d * kv, d * d, d * i, i * d, d * i]


class StepMemory(NamedTuple):
    """Memory of one training step per GPU.

    Attributes:
        memory: Bytes by component (the two phases marked ``(*)``: only the larger one counts).
        peak: Peak bytes, context and fragmentation overhead included.
        host: Pinned host bytes activation offloading takes per GPU (0 without offloading).
    """

    memory: dict[str, int]
    peak: int
    host: int


def memory_per_gpu(
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
) -> StepMemory:
    """Per-GPU bytes of one training step by component, the peak, and the host memory offloading takes.

    Args:
        shape: Model sizes.
        seq_len: Training length (the whole sequence; a context-parallel rank holds its slice).
        batch_size: Micro-batch per GPU.
        gpus: GPUs (FSDP shards over all of them).
        dtype: Compute dtype.
        fp32_trainable_params: fp32 master copies of the trainable tensors.
        trainable: Trainable parameters (:func:`parameter_counts`).
        total: All parameters.
        checkpoint_layers: Decoder layers checkpointed (the first N).
        fsdp: FSDP2 sharding.
        s2: S² attention (else full).
        loss_chunks: Chunks of the loss.
        lora_rank: LoRA rank.
        lora_modules: Attention projections with LoRA.
        optimizer_state_dtype: AdamW state dtype (None: the trainable parameters').
        activation_offloading: torchtune's activation offloading.
        cpu_offload: The what-if of sharded state in host memory.
        quantize_base: QLoRA (NF4 frozen projections).
        context_parallel_degree: GPUs sharing each sequence.
        group_size: S² group size (None: full attention).
        family: The model's family.
        trainable_extras: The recipe's ``trainable_extras``.
        linear_ce: The loss is ``ChunkedLinearCrossEntropyLoss``.
        sequence_tile_tokens: Tokens per tile of the MLP blocks (None: not tiled).

    Returns:
        The :class:`StepMemory`.
    """
    e = DTYPE_BYTES[dtype]
    shard = gpus if fsdp else 1
    lora = shape.lora_params(lora_rank, lora_modules)
    frozen = total - trainable
    # The recipe's fp32_trainable_params: the trainable tensors are fp32 master copies (FSDP2 casts them to
    # the compute dtype when it gathers them), their gradients are reduced into fp32 and AdamW's moments
    # follow the parameter dtype. Without it every parameter is in the compute dtype. Frozen weights always
    # are.
    trainable_e = FP32_BYTES if fp32_trainable_params else e
    opt_e = DTYPE_BYTES[optimizer_state_dtype] if optimizer_state_dtype else trainable_e
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
        (LINEAR_CE_PHASE if linear_ce else LOSS_PHASE): act.loss_phase,
        LAYER_PHASE: act.recompute_transient
        + _seam_bytes(shape, batch_size, e, context_parallel_degree, group_size),
    }
    live = sum(memory.values()) - min(act.loss_phase, memory[LAYER_PHASE])
    overhead = _CONTEXT_BYTES + int(_FRAGMENTATION * live)
    memory["overhead (context, fragmentation)"] = overhead
    host = 0
    if activation_offloading:
        host = pinned_bytes(
            offloaded_tensor_bytes(
                shape,
                -(-seq_len // context_parallel_degree),
                batch_size,
                dtype=dtype,
                checkpoint_layers=checkpoint_layers,
                lora_rank=lora_rank,
                lora_modules=lora_modules,
                family=family,
                sequence_tile_tokens=sequence_tile_tokens,
                # A context-parallel slice attends its groups around the seam differently: one piece.
                group_size=group_size if context_parallel_degree == 1 else None,
            )
        )
    return StepMemory(memory, live + overhead, host)


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
