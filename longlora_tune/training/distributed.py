"""Process group, device and dtype, rank-0 work, FSDP2 sharding and seeded LoRA initialisation.

Shared by the training recipe, the evaluation recipes and the benchmarks, so that "which device", "which
dtype" and "how is a model sharded" have one answer. A single process without torchrun may still form a
one-rank process group (the training recipe does, so one code path serves 1 and N ranks).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from longlora_tune.errors import LongLoRAConfigError, RaisedOnRankZero, exit_code

__all__ = [
    "ParallelLayout",
    "build_device_mesh",
    "close_process_group",
    "fp32_trainable_policy",
    "init_lora_weights",
    "init_process_group",
    "parallel_layout",
    "rank_and_world_size",
    "resolve_device",
    "resolve_dtype",
    "run_on_rank_zero",
    "seed_rank",
    "shard_model",
]

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(device: Optional[str] = None) -> torch.device:
    """This rank's device.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None/``"auto"`` (CUDA when available). Under torchrun
            a bare ``"cuda"`` becomes ``cuda:$LOCAL_RANK``.

    Returns:
        The device (made current on CUDA).

    Raises:
        LongLoRAConfigError: if CUDA is requested but not available, or the name is invalid.
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise LongLoRAConfigError(
            f"device={device!r} is not a valid device name; use cpu, cuda or auto"
        ) from e
    if dev.type not in ("cpu", "cuda"):
        raise LongLoRAConfigError(f"device={device!r} is not supported; use cpu, cuda or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LongLoRAConfigError(f"device={device!r} but CUDA is not available; set device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    """The parameter/compute dtype.

    Args:
        dtype: ``bf16``, ``fp16``, ``fp32`` (or the long names); None means bf16 on CUDA, fp32 on CPU.
        device: the device the model runs on.

    Returns:
        The torch dtype.

    Raises:
        LongLoRAConfigError: for an unknown name, or bf16 on a GPU without bf16 support.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise LongLoRAConfigError(f"dtype={dtype!r} is not supported; use one of bf16, fp16, fp32")
    out = _DTYPES[key]
    if out == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LongLoRAConfigError("dtype=bf16 but this GPU does not support bf16; use fp32")
    return out


def seed_rank(seed: int) -> None:
    """Seed torch, numpy and ``random`` on this rank with ``seed + rank`` (torchtune's ``set_seed``), quietly.

    torchtune announces the seed with a DEBUG line on its shared logger, which its own modules set to DEBUG
    whenever they are imported, so the line reaches the console although it only repeats the config's seed.

    Args:
        seed: the run's seed (``seed`` in the config).
    """
    from torchtune import training, utils

    logger = utils.get_logger()
    level = logger.level
    logger.setLevel(max(level, logging.INFO))
    try:
        training.set_seed(seed=seed)
    finally:
        logger.setLevel(level)


def init_process_group(device: torch.device, *, solo_group: bool) -> bool:
    """Join torchrun's process group, or (``solo_group``) form a one-rank group outside torchrun.

    Args:
        device: this rank's device (nccl for CUDA with gloo beside it for CPU tensors; gloo on CPU).
        solo_group: outside torchrun, create a one-rank group so collectives work unchanged.

    Returns:
        True if this call created the group (the caller then destroys it with
        :func:`close_process_group`).
    """
    if dist.is_initialized():
        return False
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_torchrun and not solo_group:
        return False
    # Gathered states and RNG objects are CPU tensors: on GPUs gloo runs beside nccl for them.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if under_torchrun:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def close_process_group(created: bool = True) -> None:
    """Destroy the process group if this process created it, and free its backends at once.

    Args:
        created: what :func:`init_process_group` returned.
    """
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _free_the_backends()


def _free_the_backends() -> None:
    """Free the destroyed group's backends now, while the interpreter is fully alive.

    ``destroy_process_group`` only drops torch's own table of groups; a backend (and gloo's worker threads)
    lives on while anything refers to it. torch.distributed's caches (DTensor's sharding propagation,
    redistribution plans and transforms, mesh topologies) keep the device meshes of FSDP2's parameters, and
    so their groups, after the model is gone; modules in reference cycles keep theirs until a collection.
    Left to interpreter shutdown, tearing those threads down can abort a run that finished (SIGABRT,
    "terminate called without an active exception"). Callers drop their model first.
    ``tests/recipes/test_teardown.py`` fails if a torch version keeps the group alive another way.
    """
    import gc

    _empty_torch_distributed_caches()
    gc.collect()


def _empty_torch_distributed_caches() -> None:
    """Empty torch.distributed's caches (emptying a cache only costs a recomputation).

    The non-functools ones are torch internals, looked up by name and skipped if gone. A function of its
    own, so that nothing it looked at (``gc.get_objects()`` holds every object) outlives it.
    """
    import functools
    import gc
    import importlib

    if "torch.distributed.tensor" in sys.modules:  # otherwise no DTensor was ever made
        # DTensor's C++ fast-path sharding cache and the redistribution planners' table.
        for module, name in (
            ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
            ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
        ):
            try:
                clear = getattr(importlib.import_module(module), name, None)
            except ImportError:
                continue
            if clear is not None:
                clear()
    for obj in gc.get_objects():
        # A function made by exec() can have __module__ None.
        if type(obj) is functools._lru_cache_wrapper and str(obj.__module__).startswith("torch.distributed."):
            obj.cache_clear()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_on_rank_zero(fn: Callable[[], Any], *, share_result: bool = True) -> Any:
    """Run ``fn`` on rank 0 only; if it fails there, every rank raises, so none waits in a collective.

    Checkpoint and data folders then need to be visible to rank 0 only (no shared file system across
    nodes). Without a process group, ``fn`` simply runs.

    Args:
        fn: the work.
        share_result: broadcast the (picklable) result to all ranks; otherwise the other ranks get None.

    Returns:
        ``fn``'s result.

    Raises:
        Exception: on rank 0, whatever ``fn`` raised.
        RaisedOnRankZero: on the other ranks when ``fn`` raised one of our reported errors on rank 0 (they
            exit with its code; rank 0 prints the message once).
        RuntimeError: on the other ranks when ``fn`` raised anything else on rank 0.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return fn()
    result, payload, error = None, [None, None], None
    if rank == 0:
        try:
            result = fn()
            payload = [result if share_result else None, None]
        except Exception as e:
            error = e
            payload = [None, (exit_code(e), f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[1] is not None:
        code, message = payload[1]
        if code is not None:
            raise RaisedOnRankZero(code, message)
        raise RuntimeError(f"rank 0 failed, stopping this rank too: {message}")
    return payload[0] if share_result else result


def fp32_trainable_policy(model: nn.Module, dtype: torch.dtype, fp32_trainable: bool) -> Optional[Any]:
    """Keep the trainable tensors in float32 and return the FSDP2 policy that computes in ``dtype``.

    bf16 cannot hold LoRA+'s small updates: at lr 2e-5 a norm scale near 1.0 (bf16 step 2^-7) or an
    embedding entry near 0.02 never changes. The trainable tensors therefore stay fp32 (master weights,
    fp32 AdamW state, fp32 gradient reduction) and FSDP2 casts them to the compute dtype when it gathers
    them; the frozen base weights stay in the compute dtype.

    Args:
        model: The model, before :func:`shard_model` (its trainable parameters are cast in place).
        dtype: The compute dtype.
        fp32_trainable: The ``fp32_trainable_params`` setting.

    Returns:
        A ``MixedPrecisionPolicy`` for :func:`shard_model`, or None when training in float32 or without
        fp32 masters (nothing is cast).
    """
    if dtype == torch.float32 or not fp32_trainable:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_model(
    model: nn.Module,
    *,
    reshard_after_forward: bool = True,
    mp_policy: Optional[Any] = None,
    ignored_params: Optional[set[nn.Parameter]] = None,
) -> None:
    """FSDP2: each decoder layer and the root, with an optional mixed-precision policy.

    torchtune 0.6.1's ``training.shard_model`` takes no mixed-precision policy, which the fp32 master
    copies of the trainable tensors need; the per-layer conditions are torchtune's.

    Args:
        model: the model (on the meta device or materialised).
        reshard_after_forward: free gathered parameters after forward (one more all-gather in backward).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` or None.
        ignored_params: parameters FSDP2 leaves unsharded and unmanaged (see
            ``longlora_tune.training.qlora.fsdp_ignored_params``).
    """
    from torch.distributed.fsdp import fully_shard
    from torchtune import training

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if ignored_params:
        kwargs["ignored_params"] = ignored_params
    for name, module in reversed(list(model.named_modules())):
        if training.get_shard_conditions(name, module):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def init_lora_weights(
    names: Iterable[str], shapes: dict[str, tuple[int, ...]], *, seed: int
) -> dict[str, torch.Tensor]:
    """Seeded full-size initial values of LoRA matrices, identical for every world size.

    torchtune's init: ``lora_a`` Kaiming-uniform (a=sqrt(5)), ``lora_b`` zero. Generating the full tensors
    from one seed (rather than each rank initialising its shard) makes a 1-rank and an N-rank run start
    from the same weights.

    Args:
        names: parameter names to initialise (all must be LoRA matrices).
        shapes: name -> full shape.
        seed: the generator seed.

    Returns:
        name -> tensor (fp32, CPU).

    Raises:
        LongLoRAConfigError: for a name that is not a LoRA matrix (the base checkpoint lacks a weight the
            model has: the model config does not match the checkpoint).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(names):
        if name.endswith("lora_a.weight"):
            t = torch.empty(shapes[name])
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        elif name.endswith("lora_b.weight"):
            t = torch.zeros(shapes[name])
        else:
            raise LongLoRAConfigError(
                f"the base checkpoint has no weight for {name}, and it is not a LoRA matrix; "
                "the model config does not match the checkpoint"
            )
        out[name] = t
    return out


def build_device_mesh(device_type: str, *, context_parallel_degree: int = 1) -> Any:
    """The 2-D ``(dp, cp)`` device mesh of data-parallel x context-parallel ranks, as torchtitan builds it.

    Ranks ``[i*P, (i+1)*P)`` form context-parallel group ``i`` (neighbours share one sequence, so the halo
    messages stay between adjacent ranks, e.g. inside one node); ``mesh["cp"].get_group()`` is the group
    for :func:`longlora_tune.modules.context_parallel.context_parallel_s2_attention` and
    ``mesh["dp"]`` picks the data. FSDP2 shards over both dimensions (``fully_shard(mesh=mesh)`` on the
    flattened mesh) because every rank holds a different slice of the activations but the same weights.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        context_parallel_degree: ranks sharing one sequence (``P``); must divide the world size.

    Returns:
        A ``torch.distributed.device_mesh.DeviceMesh`` with dimension names ``("dp", "cp")``.

    Raises:
        LongLoRAConfigError: if the degree is not a positive divisor of the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    _, world_size = rank_and_world_size()
    degree = context_parallel_degree
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1 or world_size % degree:
        raise LongLoRAConfigError(
            f"context_parallel_degree={degree!r} does not divide the {world_size} rank(s); use a divisor of "
            f"{world_size}"
        )
    return init_device_mesh(device_type, (world_size // degree, degree), mesh_dim_names=("dp", "cp"))


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits in the (data-parallel x context-parallel) world.

    Attributes:
        dp_rank: index of this rank's data-parallel replica (picks the data; shared by a cp group).
        dp_size: number of data-parallel replicas (world size / cp degree).
        cp_rank: index of this rank's slice of every sequence.
        cp_degree: ranks sharing one sequence.
        cp_group: the context-parallel process group (None when ``cp_degree`` is 1).
    """

    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_degree: int
    cp_group: Any


def parallel_layout(device_type: str, context_parallel_degree: int = 1) -> ParallelLayout:
    """This rank's data- and context-parallel coordinates (every rank must call it: it creates groups).

    Degree 1 creates no process group: data parallelism over the whole world, as without the feature.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        context_parallel_degree: ranks sharing one sequence (``P``); must divide the world size.

    Returns:
        The layout (see :func:`build_device_mesh` for which ranks form a group).

    Raises:
        LongLoRAConfigError: if the degree is not a positive divisor of the world size.
    """
    rank, world_size = rank_and_world_size()
    if context_parallel_degree == 1:
        return ParallelLayout(rank, world_size, 0, 1, None)
    mesh = build_device_mesh(device_type, context_parallel_degree=context_parallel_degree)
    return ParallelLayout(
        dp_rank=mesh["dp"].get_local_rank(),
        dp_size=mesh["dp"].size(),
        cp_rank=mesh["cp"].get_local_rank(),
        cp_degree=context_parallel_degree,
        cp_group=mesh["cp"].get_group(),
    )
