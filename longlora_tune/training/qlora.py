"""QLoRA: a LongLoRA model whose frozen base linear weights are torchao NF4 tensors, under FSDP2.

``model.quantize_base: true`` makes torchtune's ``lora_llama2`` build every frozen base projection (q, k, v,
output and the MLP's w1, w2, w3; not the LM head) as an ``NF4Tensor`` (4-bit NormalFloat, blocks of 64 with
double-quantized scales). The recipe needs three things the plain path does not:

* **sharding**: FSDP2 shards NF4 parameters through their ``fsdp_pre_all_gather``/``fsdp_post_all_gather``
  extension, but its one-rank fast path unpacks only the first of NF4's three all-gather buffers (torch
  2.13: "not enough values to unpack (expected 3, got 1)"), so on one rank the NF4 weights are left out of
  FSDP (:func:`fsdp_ignored_params`); nothing is sharded on one rank anyway;
* **loading**: ``set_model_state_dict`` cannot write into NF4 parameters, and on one rank torchtune's
  state-dict hooks dequantize NF4 weights whenever ``model.state_dict()`` runs, so
  :func:`load_full_state_dict` walks the parameters instead, quantizing each full base weight once;
* **gathering**: :func:`gather_full_state_dict` returns dequantized weights for the ``hf/`` export.

The NF4 weights are rebuilt from the base checkpoint at every start (quantization is deterministic), so a
resumed run has bit-identical base weights and checkpoints hold only the trainable tensors, as without
QLoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from longlora_tune.training.distributed import rank_and_world_size

__all__ = [
    "check_nf4_shardable",
    "fsdp_ignored_params",
    "gather_full_state_dict",
    "has_nf4_params",
    "load_full_state_dict",
]

# Added to parameter names by activation checkpointing's wrapper (state dicts drop it).
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def _nf4_local(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The NF4 tensor behind ``param`` (plain or a DTensor shard), or None."""
    from torchao.dtypes.nf4tensor import NF4Tensor

    local = getattr(param, "_local_tensor", param)
    return local if isinstance(local, NF4Tensor) else None


def has_nf4_params(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is (or shards) an NF4 tensor.

    Args:
        model: the model, on any device (meta included), sharded or not.

    Returns:
        True for a QLoRA model.
    """
    return any(_nf4_local(p) is not None for p in model.parameters())


def fsdp_ignored_params(model: nn.Module, world_size: int) -> Optional[set[nn.Parameter]]:
    """The parameters FSDP2 must leave alone: the NF4 weights on one rank, else none.

    Args:
        model: the (unsharded) model.
        world_size: ranks FSDP2 shards over.

    Returns:
        A set for ``fully_shard(ignored_params=...)``, or None.
    """
    if world_size != 1:
        return None
    ignored = {p for p in model.parameters() if _nf4_local(p) is not None}
    return ignored or None


def check_nf4_shardable(model: nn.Module, world_size: int) -> None:
    """Check that FSDP2 can cut every NF4 weight into ``world_size`` equal row blocks of whole scale blocks.

    NF4 packs 64-weight blocks whose scales are quantized in groups of 256 blocks; a shard must hold whole
    groups (16384 weights) and FSDP2 cuts along rows, so torchao refuses any other split mid-training.

    Args:
        model: the model (the meta device will do).
        world_size: ranks FSDP2 shards over.

    Raises:
        LongLoRAConfigError: naming the first weight that cannot be split and the fix.
    """
    from longlora_tune.errors import LongLoRAConfigError

    if world_size == 1:
        return
    for name, param in model.named_parameters():
        nf4 = _nf4_local(param)
        if nf4 is None:
            continue
        rows, group = param.shape[0], nf4.block_size * nf4.scaler_block_size
        if rows % world_size or (param.numel() // world_size) % group:
            raise LongLoRAConfigError(
                f"model.quantize_base=true cannot shard {name} {tuple(param.shape)} over {world_size} ranks "
                f"(NF4 needs whole groups of {group} weights per rank); use a world size that splits it "
                "into such groups, or set model.quantize_base=false"
            )


def _broadcast(tensor: Optional[torch.Tensor], like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rank 0's full tensor on every rank (in ``like``'s dtype and global shape, on ``device``)."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor.to(device=device, dtype=like.dtype)
    if tensor is None:
        tensor = torch.empty(like.shape, dtype=like.dtype, device=device)
    else:
        tensor = tensor.to(device=device, dtype=like.dtype).contiguous()
    dist.broadcast(tensor, src=0)
    return tensor


def load_full_state_dict(model: nn.Module, full_sd: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Fill a sharded QLoRA model from a full state dict held by rank 0 (strict: every parameter).

    Tensor by tensor, rank 0 broadcasts the full weight; each rank then keeps its part: NF4 weights are
    quantized from the full weight (so every world size quantizes the same blocks) and sharded as torchtune
    does, FSDP2's other parameters get their shard copied in, and NF4 weights that FSDP2 ignores (one rank)
    are replaced by the quantized tensor. Call after ``shard_model`` and ``model.to_empty``.

    Args:
        model: the sharded model (``shard_model`` with :func:`fsdp_ignored_params`).
        full_sd: name -> full tensor on rank 0 (consumed); ignored on the other ranks.
        device: this rank's device.

    Raises:
        KeyError: on rank 0 when ``full_sd`` lacks a parameter of the model, or holds one it lacks.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torchao.dtypes.nf4tensor import to_nf4
    from torchtune import training

    rank, _ = rank_and_world_size()
    full_sd = dict(full_sd) if rank == 0 else {}
    for module_name, module in list(model.named_modules()):
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{module_name}.{pname}" if module_name else pname
            name = name.replace(_CHECKPOINT_PREFIX, "")
            full = _broadcast(full_sd.pop(name) if rank == 0 else None, param, device)
            nf4 = _nf4_local(param)
            if nf4 is not None and isinstance(param, DTensor):
                # torchtune quantizes the full weight and cuts NF4's packed buffers along dim 0.
                training.load_from_full_model_state_dict(model, {name: full}, device, strict=False)
            elif nf4 is not None:
                quantized = to_nf4(full, block_size=nf4.block_size, scaler_block_size=nf4.scaler_block_size)
                module._parameters[pname] = nn.Parameter(quantized, requires_grad=False)
            elif isinstance(param, DTensor):
                shard = distribute_tensor(full, param.device_mesh, param.placements)
                with torch.no_grad():
                    param.to_local().copy_(shard.to_local())
            else:
                with torch.no_grad():
                    param.copy_(full)
            del full
    if full_sd:
        raise KeyError(f"the state holds {len(full_sd)} tensors the model lacks (first: {min(full_sd)})")


def gather_full_state_dict(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """The full state on rank 0's CPU with NF4 weights dequantized to their compute dtype.

    Args:
        model: the sharded QLoRA model.
        device: this rank's device (offloaded shards come back to it for the gather).

    Returns:
        name -> full tensor on rank 0; an empty dict on the other ranks.
    """
    from torchtune import training

    rank, _ = rank_and_world_size()
    return training.gather_cpu_state_dict(model, rank == 0, device=device)
