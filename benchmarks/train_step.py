"""One LongLoRA training step, timed: model shapes, variants and the measurement of a single case.

A *case* is one (variant, S² backend, sequence length) on one device. It builds the model with
:func:`longlora_tune.models.longlora_llama2`, sets the trainable set with
:func:`longlora_tune.models.trainable.set_trainable_params`, turns on torchtune's activation checkpointing
(and, when asked, the recipe's sequence tiling of the MLP blocks) and times full training steps: forward,
``CEWithChunkedOutputLoss``, backward and an AdamW step over the trainable parameters. One warm-up step
runs first; the timed steps follow. :func:`run_case` measures in the current process; the CLI runs every
case in a fresh process (see :mod:`benchmarks.__main__`) so that memory peaks of one case do not leak into
the next.

Time: wall-clock per step (``step_s``) and the process's CPU time per step (``cpu_step_s``). On a CPU shared
with other processes the wall time of a one-thread run includes the time it waited for a core; its CPU time
does not, so CPU-time ratios are the robust comparison there (on CUDA only wall time means anything).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (absolute, model included) and its increase over the
built model; on CPU the increase of the process's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident set after building the model, which includes optimizer
state and whatever the allocator keeps.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torchtune import training
from torchtune.modules.loss import CEWithChunkedOutputLoss

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models import longlora_llama2
from longlora_tune.models.shapes import MODEL_SHAPES, ModelShape
from longlora_tune.models.trainable import TRAINABLE_EXTRAS, set_trainable_params
from longlora_tune.modules.linear_ce import ChunkedLinearCrossEntropyLoss
from longlora_tune.modules.lora_fused import enable_fused_lora
from longlora_tune.modules.loss import summed_token_loss
from longlora_tune.modules.s2_attention import S2AttentionConfig, flash_attn_available
from longlora_tune.plan.flops import step_flops
from longlora_tune.training.activation_checkpointing import apply_activation_checkpointing
from longlora_tune.training.compile import compile_model_and_loss
from longlora_tune.training.distributed import resolve_device, resolve_dtype
from longlora_tune.training.sequence_tiling import apply_sequence_tiling

__all__ = [
    "BENCH_SHAPES",
    "LORA_IMPLS",
    "LOSSES",
    "PEER_VARIANT",
    "VARIANTS",
    "add_flops",
    "Case",
    "detect_peak_tflops",
    "measure_steps",
    "merge_rounds",
    "profile_step",
    "resolve_shape",
    "run_case",
    "worker_env",
]

#: Benchmark model shapes. ``7b-proxy`` keeps Llama 2 7B's MLP/attention width ratio (11008/4096 ~ 1376/512)
#: and head size at a width that a CPU can train at 8192 tokens.
BENCH_SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(
        vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64, intermediate_dim=128
    ),
    "7b-proxy": ModelShape(
        vocab_size=4000, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=512, intermediate_dim=1376
    ),
    "7b": MODEL_SHAPES["7b"],
}

#: variant -> (S² on, trainable extras). All variants use the same LoRA (q, k, v, o; rank 8) and memory
#: settings; they differ only in attention and in the trainable set.
VARIANTS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "longlora": (True, tuple(TRAINABLE_EXTRAS)),
    "full_attn": (False, tuple(TRAINABLE_EXTRAS)),
    "lora": (False, ()),
}

#: The transformers + PEFT step a user would otherwise assemble (measured by benchmarks.peer).
PEER_VARIANT = "peer"

#: Losses of our step (the peer always uses transformers' own): see :attr:`Case.loss_impl`.
LOSSES = ("chunked", "fused")

#: LoRA forward of our step: see :attr:`Case.lora_impl`.
LORA_IMPLS = ("torchtune", "fused")

#: The precisions a case may name (resolved by longlora_tune.training.distributed.resolve_dtype, as in the
# recipe).
_DTYPES = ("fp32", "bf16", "fp16")

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, most specific first.
_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)


@dataclass(frozen=True)
class Case:
    """One measurement.

    Attributes:
        shape: Model shape name in :data:`BENCH_SHAPES`.
        layers: Override of the shape's layer count (None keeps it).
        seq_len: Tokens per sequence.
        batch_size: Sequences per step.
        variant: Key of :data:`VARIANTS`.
        backend: S² backend (``sdpa``, ``flash``, ``flex``); full attention always runs torchtune's SDPA.
        device: ``cpu`` or ``cuda``.
        dtype: ``fp32``, ``bf16`` or ``fp16``.
        repeats: Timed steps after the warm-up.
        threads: torch CPU threads.
        activation_checkpointing: torchtune's per-layer activation checkpointing.
        checkpoint_layers: With ``activation_checkpointing``, checkpoint only the first N decoder layers (the
            recipe's ``activation_checkpointing_layers``); None checkpoints all of them.
        sequence_tile_tokens: Run every layer's MLP block over tiles of this many tokens, as the recipe's
            ``sequence_tile_tokens`` (:mod:`longlora_tune.training.sequence_tiling`); None: untiled.
        loss_chunks: Token chunks of the loss.
        loss_impl: ``chunked``: torchtune's ``CEWithChunkedOutputLoss`` on the model's chunked logits;
            ``fused``: :class:`longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss` (projection and
            loss in one chunked op, no logits kept for backward).
        lora_impl: ``torchtune``: ``LoRALinear`` as built; ``fused``: its dropout-free fast path
            (:func:`longlora_tune.modules.lora_fused.enable_fused_lora`).
        peak_tflops: Device bf16 dense peak for MFU (None: detect on CUDA, no MFU on CPU).
        compile: ``torch.compile`` the decoder layers and the loss as ``compile: true`` does
            (:func:`longlora_tune.training.compile.compile_model_and_loss`); the warm-up step then compiles.
        profile: After the timed steps, run one more step under ``torch.profiler`` and report this many
            top operators by self CPU time (0: no profile). Not included in the timings.
    """

    shape: str
    seq_len: int
    variant: str
    backend: str = "sdpa"
    layers: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    repeats: int = 3
    threads: int = 1
    activation_checkpointing: bool = True
    checkpoint_layers: int | None = None
    sequence_tile_tokens: int | None = None
    loss_chunks: int = 8
    peak_tflops: float | None = None
    compile: bool = False
    profile: int = 0
    loss_impl: str = "chunked"
    lora_impl: str = "torchtune"

    def __post_init__(self) -> None:
        if self.shape not in BENCH_SHAPES:
            raise ValueError(f"Unknown shape {self.shape!r}; choose one of {sorted(BENCH_SHAPES)}")
        if self.variant not in VARIANTS and self.variant != PEER_VARIANT:
            raise ValueError(
                f"Unknown variant {self.variant!r}; choose one of {sorted(VARIANTS)} or {PEER_VARIANT!r}"
            )
        if self.backend not in ("sdpa", "flash", "flex"):
            raise ValueError(f"Unknown S2 backend {self.backend!r}; choose sdpa, flash or flex")
        if self.dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {sorted(_DTYPES)}")
        if self.loss_impl not in LOSSES:
            raise ValueError(f"Unknown loss_impl {self.loss_impl!r}; choose one of {LOSSES}")
        if self.lora_impl not in LORA_IMPLS:
            raise ValueError(f"Unknown lora_impl {self.lora_impl!r}; choose one of {LORA_IMPLS}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("seq_len", "batch_size", "repeats", "threads", "loss_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            raise ValueError(f"checkpoint_layers must be >= 0 or None (all), got {self.checkpoint_layers}")
        if self.sequence_tile_tokens is not None and self.sequence_tile_tokens < 1:
            raise ValueError(f"sequence_tile_tokens must be >= 1 or None, got {self.sequence_tile_tokens}")
        if self.seq_len % 8:
            raise ValueError(
                f"seq_len must be a multiple of 8 (the S2 group seq_len/4 must be even), got {self.seq_len}"
            )


def resolve_shape(name: str, layers: int | None = None) -> ModelShape:
    """The :class:`ModelShape` of a benchmark shape, optionally with another layer count.

    Args:
        name: Key of :data:`BENCH_SHAPES`.
        layers: Layer count override.

    Returns:
        The shape.

    Raises:
        ValueError: On an unknown name.
    """
    if name not in BENCH_SHAPES:
        raise ValueError(f"Unknown shape {name!r}; choose one of {sorted(BENCH_SHAPES)}")
    shape = BENCH_SHAPES[name]
    if layers is None:
        return shape
    return ModelShape(
        shape.vocab_size, layers, shape.num_heads, shape.num_kv_heads, shape.embed_dim, shape.intermediate_dim
    )


def detect_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU from its name (None when unknown).

    Args:
        device_name: ``torch.cuda.get_device_name()``.

    Returns:
        Peak TFLOP/s or None.
    """
    for key, value in _PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case) -> dict[str, Any]:
    """Build the model of ``case`` and time its training steps in this process.

    Args:
        case: What to measure.

    Returns:
        A JSON-ready dict: the case, ``step_s`` (every timed step), ``median_s``, ``min_s``, ``max_s``,
        ``cpu_step_s`` and ``median_cpu_s`` (process CPU time),
        ``tokens_per_s``, ``warmup_s`` (the first step, compile included), memory fields (``memory_kind``
        says which), FLOP counts, ``mfu`` (CUDA with a known peak), ``loss``, trainable parameter counts
        and load averages before/after.

    Raises:
        ValueError: If the device, backend or dtype is unavailable here.
    """
    try:
        device = resolve_device(case.device)
        dtype = resolve_dtype(case.dtype, device)
    except LongLoRAConfigError as e:
        raise ValueError(str(e)) from e
    if case.backend == "flash" and not flash_attn_available():
        raise ValueError("backend 'flash' needs flash-attn and CUDA; it is not importable here")
    if case.backend == "flex" and device.type != "cuda":
        raise ValueError("backend 'flex' trains only on CUDA (flex_attention backward needs a GPU)")
    if device.type == "cpu":
        torch.set_num_threads(case.threads)
    s2, extras = VARIANTS[case.variant]
    shape = resolve_shape(case.shape, case.layers)
    load_before = os.getloadavg()

    torch.manual_seed(0)
    with training.set_default_dtype(dtype), device:
        model = longlora_llama2(
            **asdict(shape),
            max_seq_len=case.seq_len,
            s2_backend=case.backend,
            use_full_attn=not s2,
        )
    counts = set_trainable_params(model, extras=extras)
    if case.lora_impl == "fused":
        enable_fused_lora(model)
    if case.loss_impl == "fused":
        loss_fn = ChunkedLinearCrossEntropyLoss(num_output_chunks=case.loss_chunks)
    else:
        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=case.loss_chunks)
    if case.compile:
        # The recipe's order: layers compiled before activation checkpointing wraps them.
        try:
            loss_fn = compile_model_and_loss(model, loss_fn, device=device, verbose=False)
        except LongLoRAConfigError as e:
            raise ValueError(str(e)) from e
    try:
        if case.activation_checkpointing:
            apply_activation_checkpointing(model, case.checkpoint_layers)
        apply_sequence_tiling(model, case.sequence_tile_tokens)
    except LongLoRAConfigError as e:
        raise ValueError(str(e)) from e
    model.train()
    if case.loss_impl == "fused":
        loss_fn.set_model_output(model)
    else:
        model.set_num_output_chunks(case.loss_chunks)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (case.batch_size, case.seq_len), generator=generator).to(
        device
    )
    # Next-token targets (the last wraps around to the first token: every position is scored).
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1)}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        # The recipe's loss call (either loss), as a mean over the scored tokens.
        loss_sum, n_tokens = summed_token_loss(
            model, loss_fn, batch, device=device, ignore_index=-100, labels_shifted=True
        )
        loss = loss_sum / n_tokens
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    result = measure_steps(case, device, step, load_before=load_before)
    result["trainable"] = counts
    group_size = S2AttentionConfig().resolve_group_size(case.seq_len) if s2 else None
    add_flops(result, case, shape, group_size, device)
    return result


def step_time_fields(times: list[float], cpu_times: list[float], tokens_per_step: int) -> dict[str, Any]:
    """The timing fields of a result from its timed steps: the median step is the figure reported.

    Args:
        times: Wall-clock seconds of each timed step.
        cpu_times: Process CPU seconds of each timed step.
        tokens_per_step: Tokens one step trains on (batch x sequence length).

    Returns:
        ``step_s``, ``median_s``, ``min_s``, ``max_s``, ``cpu_step_s``, ``median_cpu_s`` and
        ``tokens_per_s`` (from the median step).
    """
    median = statistics.median(times)
    return dict(
        step_s=times,
        median_s=median,
        min_s=min(times),
        max_s=max(times),
        cpu_step_s=cpu_times,
        median_cpu_s=statistics.median(cpu_times),
        tokens_per_s=tokens_per_step / median,
    )


def measure_steps(
    case: Case, device: torch.device, step: Callable[[], float], *, load_before: tuple[float, ...]
) -> dict[str, Any]:
    """Run one warm-up and ``case.repeats`` timed calls of ``step`` and measure time and peak memory.

    Args:
        case: The case (its fields go into the result).
        device: Where the step runs.
        step: One training step (zero grads, forward, loss, backward, optimizer step); returns the loss.
        load_before: ``os.getloadavg()`` before the model was built.

    Returns:
        The case's fields plus ``step_s``, ``median_s``, ``min_s``, ``max_s``, ``cpu_step_s``,
        ``median_cpu_s``, ``tokens_per_s``, ``loss``, load averages and the memory fields.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    else:
        base_mem = _rss_bytes("VmRSS")
        rss_resettable = _reset_peak_rss()

    warmup_start = time.perf_counter()
    loss = step()  # warm-up: allocates optimizer state, compiles (torch.compile, flex kernels), fills caches
    _sync(device)
    warmup_s = time.perf_counter() - warmup_start
    times, cpu_times = [], []
    for _ in range(case.repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    result: dict[str, Any] = asdict(case)
    result.update(
        step_time_fields(times, cpu_times, case.batch_size * case.seq_len),
        loss=loss,
        warmup_s=warmup_s,
        load_avg_before=load_before,
        load_avg_after=os.getloadavg(),
        torch=torch.__version__,
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result.update(
            memory_kind="cuda max_memory_allocated",
            peak_mem_bytes=peak,
            peak_mem_over_model_bytes=peak - base_mem,
            device_name=torch.cuda.get_device_name(device),
        )
    else:
        hwm = _rss_bytes("VmHWM")
        over = hwm - base_mem if (hwm is not None and base_mem is not None and rss_resettable) else None
        result.update(
            memory_kind="cpu peak RSS (VmHWM) increase over the built model"
            if over is not None
            else "unavailable",
            peak_mem_bytes=hwm,
            peak_mem_over_model_bytes=over,
            device_name="cpu",
        )
    if case.profile:
        # After the memory readings: the profiler's own bookkeeping must not count as the step's memory.
        result["op_profile"] = profile_step(step, device, case.profile)
    return result


def profile_step(step: Callable[[], float], device: torch.device, top: int) -> dict[str, Any]:
    """Run ``step`` once under ``torch.profiler`` and summarise its operators by self time.

    Self time is the time spent in an operator outside the operators it calls, so the rows add up to the
    step (``total_self_ms``); on one CPU thread it says which kernels the step's time goes to.

    Args:
        step: One training step.
        device: Where it runs (CUDA adds the device's self time).
        top: How many operators to keep, most expensive first.

    Returns:
        ``{"total_self_ms", "ops": [{"name", "calls", "self_ms", "share"}, ...]}`` (``share`` of the
        total self time; ``self_ms`` is device time on CUDA, CPU time otherwise).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    ops = [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": getattr(e, key) / 1e3,
            "share": getattr(e, key) / total if total else 0.0,
        }
        for e in events[:top]
    ]
    return {"total_self_ms": total / 1e3, "ops": ops}


def add_flops(
    result: dict[str, Any], case: Case, shape: ModelShape, group: int | None, device: torch.device
) -> None:
    """Add the step's model/executed FLOPs, model TFLOP/s and MFU (CUDA or a given peak) to ``result``.

    Args:
        result: Output of :func:`measure_steps` (updated in place).
        case: The case.
        shape: Its model shape.
        group: S² group size (None: full attention).
        device: Where it ran.
    """
    median = result["median_s"]
    flops = step_flops(
        shape,
        case.seq_len,
        case.batch_size,
        group_size=group,
        activation_checkpointing=case.activation_checkpointing,
        checkpoint_layers=case.checkpoint_layers,
        sequence_tile_tokens=case.sequence_tile_tokens,
    )
    result.update(
        model_flops=flops.model, executed_flops=flops.total, model_tflops_per_s=flops.model / median / 1e12
    )
    peak_tflops = case.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = detect_peak_tflops(result["device_name"])
    result["peak_tflops"] = peak_tflops
    result["mfu"] = flops.model / median / (peak_tflops * 1e12) if peak_tflops else None


def worker_env(case: Case) -> dict[str, str]:
    """The environment of a worker process that measures ``case``.

    Args:
        case: The case the worker runs.

    Returns:
        A copy of ``os.environ`` that imports this copy of the package and matches the thread pools.
    """
    env = dict(os.environ)
    # The worker imports this package by name: make sure it resolves to this copy, installed or not.
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    if case.device == "cpu":
        # Intra-op pools of MKL/OpenMP must match torch's thread count or they oversubscribe the cores.
        env.update(OMP_NUM_THREADS=str(case.threads), MKL_NUM_THREADS=str(case.threads))
    return env


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the timed steps of one case measured in several rounds (each round a fresh process)."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    merged = dict(ok[-1])
    times = [t for r in ok for t in r["step_s"]]
    cpu_times = [t for r in ok for t in r["cpu_step_s"]]
    merged.update(step_time_fields(times, cpu_times, merged["batch_size"] * merged["seq_len"]))
    median = merged["median_s"]
    merged.update(
        min_cpu_s=min(cpu_times),
        max_cpu_s=max(cpu_times),
        rounds=len(ok),
        model_tflops_per_s=merged["model_flops"] / median / 1e12,
        peak_mem_bytes=max((r["peak_mem_bytes"] or 0) for r in ok) or None,
        peak_mem_over_model_bytes=max((r["peak_mem_over_model_bytes"] or 0) for r in ok) or None,
    )
    if merged.get("peak_tflops"):
        merged["mfu"] = merged["model_flops"] / median / (merged["peak_tflops"] * 1e12)
    return merged
