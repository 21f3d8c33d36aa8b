"""The settings a plan is evaluated at: validated and derived once, then priced at any what-if.

:func:`resolve` checks the arguments of :func:`longlora_tune.plan.plan` and derives what the recipe
derives (the model's shape and family, the S² group size, the training-length check, the context-parallel
checks, the gradient accumulation, the parameter counts, the checkpointed layers), with the recipe's and the
builder's messages. The :class:`Scenario` it returns prices the step at another length or with some
settings changed (:meth:`Scenario.peak`, :meth:`Scenario.flops`): the suggestions and the longest-length
search are such what-ifs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from longlora_tune.models.shapes import MODEL_SHAPES, ModelShape
from longlora_tune.plan.facts import (
    DTYPE_BYTES,
    GIB,
    checkpointed_layers,
    model_family,
    resolve_group_size,
)
from longlora_tune.plan.flops import FlopEstimate, step_flops
from longlora_tune.plan.memory import StepMemory, memory_per_gpu, parameter_counts

__all__ = ["Scenario", "resolve"]


@dataclass(frozen=True)
class Scenario:
    """A plan's validated and derived settings.

    Attributes:
        name: Model name or ``"custom"``.
        shape: Model sizes.
        seq_len: Training length.
        max_seq_len: The model's ``max_seq_len``.
        group_size: S² group size (None: full attention).
        group_size_ratio: ``model.s2_group_size_ratio`` (sizes the group of a what-if length).
        explicit_group_size: The group size was given, so a what-if length keeps it.
        global_batch_size: Sequences per optimizer step over all GPUs (None when not given).
        gradient_accumulation_steps: By the recipe's rule (None without ``global_batch_size``).
        gpu_memory_gib: GiB per GPU.
        activation_checkpointing: The ``activation_checkpointing`` argument as given.
        memory_settings: Keyword arguments of :func:`~longlora_tune.plan.memory.memory_per_gpu` as planned
            (``checkpoint_layers`` is the resolved count).
    """

    name: str
    shape: ModelShape
    seq_len: int
    max_seq_len: int
    group_size: int | None
    group_size_ratio: float | None
    explicit_group_size: bool
    global_batch_size: int | None
    gradient_accumulation_steps: int | None
    gpu_memory_gib: float
    activation_checkpointing: bool
    memory_settings: dict[str, Any]

    @property
    def capacity(self) -> float:
        """Bytes per GPU."""
        return self.gpu_memory_gib * GIB

    def __getattr__(self, key: str) -> Any:
        # The planned settings read as attributes (scenario.batch_size, scenario.family, ...).
        settings = self.__dict__.get("memory_settings", {})
        if key in settings:
            return settings[key]
        raise AttributeError(key)

    def peak(self, length: int, **overrides: Any) -> StepMemory:
        """Per-GPU memory by component, the peak and the host memory at ``length`` with ``overrides``.

        Args:
            length: Training length of the what-if.
            **overrides: :func:`~longlora_tune.plan.memory.memory_per_gpu` keywords to change.

        Returns:
            The :class:`~longlora_tune.plan.memory.StepMemory` (``memory, peak, host``).
        """
        settings = {**self.memory_settings, **overrides}
        if (
            self.group_size is not None
            and length != self.seq_len
            and self.group_size_ratio is not None
            and not self.explicit_group_size
        ):
            # What-if lengths: the builder sizes the group from the length, as for the planned one.
            settings["group_size"] = int(self.group_size_ratio * length) // 2 * 2
        return memory_per_gpu(self.shape, length, **settings)

    def fits(self, length: int, **overrides: Any) -> bool:
        """Whether the what-if's peak fits the GPU (see :meth:`peak`).

        Args:
            length: Training length of the what-if.
            **overrides: Settings to change.

        Returns:
            True when the peak is at most the GPU's memory.
        """
        return self.peak(length, **overrides)[1] <= self.capacity

    def flops(self, *, full_attention: bool = False, **overrides: Any) -> FlopEstimate:
        """FLOPs of the planned step (causal counting), with ``overrides`` of :func:`step_flops` keywords.

        Args:
            full_attention: Count full attention instead of the planned S² groups.
            **overrides: ``step_flops`` keywords to change (``checkpoint_layers``,
                ``activation_checkpointing``, ``sequence_tile_tokens``).

        Returns:
            The :class:`~longlora_tune.plan.flops.FlopEstimate`.
        """
        n_ckpt = self.checkpoint_layers
        kwargs = dict(
            activation_checkpointing=n_ckpt > 0,
            checkpoint_layers=n_ckpt,
            lora_rank=self.lora_rank,
            lora_modules=self.lora_modules,
            trainable_extras=self.trainable_extras,
            sequence_tile_tokens=self.sequence_tile_tokens,
        )
        kwargs.update(overrides)
        group_size = None if full_attention else self.group_size
        return step_flops(self.shape, self.seq_len, self.batch_size, group_size=group_size, **kwargs)


def _model(model: str | ModelShape) -> tuple[str, ModelShape]:
    if isinstance(model, str):
        if model not in MODEL_SHAPES:
            raise ValueError(
                f"Unknown model {model!r}; choose one of {sorted(MODEL_SHAPES)} or pass a ModelShape"
            )
        return model, MODEL_SHAPES[model]
    if isinstance(model, ModelShape):
        return "custom", model
    raise ValueError(f"model must be a name or a ModelShape, got {type(model).__name__}")


def _check_numbers(
    *,
    dtype: str,
    optimizer_state_dtype: str | None,
    seq_len: int,
    gpus: int,
    batch_size: int,
    loss_chunks: int,
    gpu_memory_gib: float,
    sequence_tile_tokens: int | None,
) -> None:
    from longlora_tune.training.sequence_tiling import check_tile_tokens

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer_state_dtype is not None and optimizer_state_dtype not in DTYPE_BYTES:
        raise ValueError(
            f"optimizer_state_dtype must be one of {sorted(DTYPE_BYTES)}, got {optimizer_state_dtype!r}"
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


def _check_context_parallel(degree: Any, gpus: int, s2: bool, seq_len: int, group_size: int | None) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1 or gpus % degree:
        raise ValueError(f"context_parallel_degree={degree!r} must be a positive divisor of gpus={gpus}")
    if degree > 1 and not s2:
        raise ValueError(
            f"context_parallel_degree={degree} needs S2 attention (full attention would need ring attention)"
        )
    if degree > 1:
        from longlora_tune.modules.context_parallel import check_context_parallel  # torch

        check_context_parallel(seq_len, degree, group_size)


def resolve(
    model: str | ModelShape,
    seq_len: int,
    *,
    gpus: int,
    gpu_memory_gib: float,
    batch_size: int,
    dtype: str,
    fp32_trainable_params: bool,
    activation_checkpointing: bool,
    checkpoint_layers: int | None,
    fsdp: bool,
    s2: bool,
    max_seq_len: int | None,
    group_size: int | None,
    group_size_ratio: float | None,
    loss_chunks: int,
    lora_rank: int,
    lora_modules: Sequence[str],
    trainable_extras: Sequence[str],
    global_batch_size: int | None,
    optimizer_state_dtype: str | None,
    activation_offloading: bool,
    cpu_offload: bool,
    quantize_base: bool,
    context_parallel_degree: int,
    family: str | None,
    linear_ce: bool,
    sequence_tile_tokens: int | None,
) -> Scenario:
    """Validate :func:`longlora_tune.plan.plan`'s arguments and derive what the recipe derives.

    Args:
        model: See :func:`longlora_tune.plan.plan`, as every other argument.
        seq_len: Training length.
        gpus: GPUs.
        gpu_memory_gib: GiB per GPU.
        batch_size: Micro-batch per GPU.
        dtype: Compute dtype.
        fp32_trainable_params: fp32 master copies of the trainable tensors.
        activation_checkpointing: Per-layer activation checkpointing.
        checkpoint_layers: The first N layers checkpointed (None: all).
        fsdp: FSDP2 sharding.
        s2: S² attention.
        max_seq_len: The model's length (None: ``seq_len``).
        group_size: S² group size.
        group_size_ratio: S² group size ratio.
        loss_chunks: Chunks of the loss.
        lora_rank: LoRA rank.
        lora_modules: Attention projections with LoRA.
        trainable_extras: Trained besides LoRA.
        global_batch_size: Sequences per optimizer step.
        optimizer_state_dtype: AdamW state dtype.
        activation_offloading: torchtune's activation offloading.
        cpu_offload: What-if of sharded state in host memory.
        quantize_base: QLoRA.
        context_parallel_degree: GPUs sharing each sequence.
        family: The model's family.
        linear_ce: The fused linear cross-entropy loss.
        sequence_tile_tokens: Tokens per MLP tile.

    Returns:
        The :class:`Scenario`.

    Raises:
        ValueError: As :func:`longlora_tune.plan.plan`.
    """
    from longlora_tune.config import validation as config_checks

    name, shape = _model(model)
    family = model_family(model, family)
    _check_numbers(
        dtype=dtype,
        optimizer_state_dtype=optimizer_state_dtype,
        seq_len=seq_len,
        gpus=gpus,
        batch_size=batch_size,
        loss_chunks=loss_chunks,
        gpu_memory_gib=gpu_memory_gib,
        sequence_tile_tokens=sequence_tile_tokens,
    )
    max_seq_len = seq_len if max_seq_len is None else max_seq_len
    explicit_g = group_size is not None
    # The builder resolves the group size even for full attention, so a setting it refuses fails here too.
    resolved = resolve_group_size(max_seq_len, group_size, group_size_ratio)
    group_size = resolved if s2 else None
    config_checks.check_training_length(seq_len, max_seq_len, group_size)
    degree = context_parallel_degree
    _check_context_parallel(degree, gpus, s2, seq_len, group_size)
    grad_accum = (
        None
        if global_batch_size is None
        else config_checks.gradient_accumulation_steps(global_batch_size, batch_size, gpus // degree)
    )
    trainable, total = parameter_counts(
        shape,
        lora_rank=lora_rank,
        lora_modules=lora_modules,
        trainable_extras=trainable_extras,
        family=family,
    )
    n_ckpt = checkpointed_layers(shape.num_layers, activation_checkpointing, checkpoint_layers)
    memory_settings = dict(
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
    return Scenario(
        name=name,
        shape=shape,
        seq_len=seq_len,
        max_seq_len=max_seq_len,
        group_size=group_size,
        group_size_ratio=group_size_ratio,
        explicit_group_size=explicit_g,
        global_batch_size=global_batch_size,
        gradient_accumulation_steps=grad_accum,
        gpu_memory_gib=gpu_memory_gib,
        activation_checkpointing=activation_checkpointing,
        memory_settings=memory_settings,
    )
