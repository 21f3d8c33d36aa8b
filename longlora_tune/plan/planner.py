"""Memory and FLOP planner for LongLoRA training runs: :func:`plan`, in named steps.

``python -m longlora_tune.plan --config llama2_7b_100k --gpus 8 --gpu-memory 80`` estimates, per GPU, the
memory of one training step (weights, gradients, optimizer state, saved activations, the chunked-loss
logits, transient backward buffers and workspace) and the FLOPs of the step with S²-Attn and with full
attention, says whether it fits and suggests settings that make it fit. :func:`plan` resolves the settings
(:func:`longlora_tune.plan.scenario.resolve`), prices them (:mod:`~longlora_tune.plan.memory`,
:mod:`~longlora_tune.plan.flops`, the context-parallel traffic of :mod:`~longlora_tune.plan.communication`)
and adds the verdict's what-ifs (:mod:`~longlora_tune.plan.suggestions`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from longlora_tune.models.shapes import ModelShape
from longlora_tune.plan.communication import (
    halo_bytes_per_layer,
    ring_bytes_per_layer,
    ulysses_bytes_per_layer,
)
from longlora_tune.plan.facts import DTYPE_BYTES
from longlora_tune.plan.result import Plan
from longlora_tune.plan.scenario import Scenario, resolve
from longlora_tune.plan.suggestions import (
    checkpoint_suggestion,
    checkpointing_peaks,
    lever_suggestions,
    longest_fitting,
)

__all__ = ["plan", "planned_scenario"]


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
    scenario = resolve(
        model,
        seq_len,
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        batch_size=batch_size,
        dtype=dtype,
        fp32_trainable_params=fp32_trainable_params,
        activation_checkpointing=activation_checkpointing,
        checkpoint_layers=checkpoint_layers,
        fsdp=fsdp,
        s2=s2,
        max_seq_len=max_seq_len,
        group_size=group_size,
        group_size_ratio=group_size_ratio,
        loss_chunks=loss_chunks,
        lora_rank=lora_rank,
        lora_modules=lora_modules,
        trainable_extras=trainable_extras,
        global_batch_size=global_batch_size,
        optimizer_state_dtype=optimizer_state_dtype,
        activation_offloading=activation_offloading,
        cpu_offload=cpu_offload,
        quantize_base=quantize_base,
        context_parallel_degree=context_parallel_degree,
        family=family,
        linear_ce=linear_ce,
        sequence_tile_tokens=sequence_tile_tokens,
    )
    result = _priced(scenario)
    # Memory-budgeted activation checkpointing: the peak for every N, and the smallest N that fits.
    result.checkpoint_layers_peak_bytes = checkpointing_peaks(scenario)
    result.checkpoint_suggestion = checkpoint_suggestion(scenario, result.checkpoint_layers_peak_bytes)
    if not suggest:
        return result
    result.max_seq_len_fitting = longest_fitting(scenario)
    if not result.fits:
        result.suggestions = lever_suggestions(scenario)
    return result


def _priced(scenario: Scenario) -> Plan:
    """The plan of the scenario as configured: memory, peak, FLOPs and context-parallel traffic."""
    s = scenario
    memory, peak, host = s.peak(s.seq_len)
    communication = _communication(
        s.shape,
        s.batch_size,
        s.seq_len,
        s.group_size,
        s.context_parallel_degree,
        DTYPE_BYTES[s.dtype],
        s.checkpoint_layers,
    )
    accumulation = s.gradient_accumulation_steps
    return Plan(
        model=s.name,
        family=s.family,
        shape=s.shape,
        seq_len=s.seq_len,
        max_seq_len=s.max_seq_len,
        batch_size=s.batch_size,
        gpus=s.gpus,
        gpu_memory_gib=s.gpu_memory_gib,
        dtype=s.dtype,
        fp32_trainable_params=bool(s.fp32_trainable_params),
        activation_checkpointing=s.activation_checkpointing,
        fsdp=s.fsdp,
        s2=s.s2,
        group_size=s.group_size,
        loss_chunks=s.loss_chunks,
        linear_ce=bool(s.linear_ce),
        sequence_tile_tokens=s.sequence_tile_tokens,
        lora_rank=s.lora_rank,
        trainable_extras=tuple(s.trainable_extras),
        global_batch_size=s.global_batch_size,
        gradient_accumulation_steps=accumulation,
        activation_offloading=s.activation_offloading,
        cpu_offload=s.cpu_offload,
        trainable_params=s.trainable,
        total_params=s.total,
        memory=memory,
        peak_bytes=peak,
        host_memory_bytes=host,
        fits=peak <= s.capacity,
        flops=s.flops(),
        flops_full_attention=s.flops(full_attention=True),
        context_parallel_degree=s.context_parallel_degree,
        communication_per_layer={k: v // s.shape.num_layers for k, v in communication.items()},
        communication_per_step={k: v * (accumulation or 1) for k, v in communication.items()},
        checkpoint_layers=s.checkpoint_layers,
    )


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


def planned_scenario(
    model: str | ModelShape, seq_len: int, **plan_kwargs: Any
) -> tuple[Scenario, dict[str, Any]]:
    """The validated scenario :func:`plan` would price, for callers that ask it their own what-ifs.

    Args:
        model: As :func:`plan`.
        seq_len: As :func:`plan`.
        **plan_kwargs: :func:`plan`'s other keywords (not ``suggest``); the rest take :func:`plan`'s defaults.

    Returns:
        The :class:`~longlora_tune.plan.scenario.Scenario` and the complete keywords (``plan(**keywords)``
        plans it).

    Raises:
        ValueError: As :func:`plan`, or when ``suggest`` is passed.
    """
    if "suggest" in plan_kwargs:
        raise ValueError("planned_scenario takes no suggest")
    # plan()'s signature is the one home of the defaults.
    bound = inspect.signature(plan).bind(model, seq_len, **plan_kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("suggest")
    return resolve(**arguments), arguments
