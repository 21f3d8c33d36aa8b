"""The planner's result: :class:`Plan`, its JSON form and its Markdown report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from longlora_tune.models.shapes import ModelShape
from longlora_tune.plan.facts import GIB
from longlora_tune.plan.flops import FlopEstimate

__all__ = ["Plan"]


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
        host_memory_bytes: Pinned host memory per GPU that activation offloading takes (0 without it):
            every offloaded tensor in the pinned allocator's power-of-two blocks
            (:func:`~longlora_tune.plan.activations.offloaded_tensor_bytes`).
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
    host_memory_bytes: int = 0

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
        out["host_memory_gib"] = self.host_memory_bytes / GIB
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
        host = self.host_memory_bytes / GIB
        lines += [
            f"| **peak** | **{self.peak_bytes / GIB:.2f}** |",
            *(
                [f"| host memory, pinned (offloaded activations) | {host:.2f} |"]
                if self.activation_offloading
                else []
            ),
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
