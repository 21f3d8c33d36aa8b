"""A dropout-free fast path for torchtune's ``LoRALinear``: base and low-rank matmuls in one autograd op.

torchtune's ``LoRALinear.forward`` is ``linear(x, W) + (alpha / r) * lora_b(lora_a(dropout(x)))``: besides
the three matmuls, autograd runs a scale and an add over the ``tokens x out`` output in forward, and in
backward a scale of the output gradient and an add of the two input-gradient contributions, each a full
pass over ``tokens x dim`` memory. Memory is not the issue without dropout (the frozen base linear saves
no activation; ``x`` is kept once, for ``lora_a``'s gradient, plus the ``tokens x r`` low-rank activation),
but with ``dropout > 0`` torchtune also keeps the dropout mask and the dropped copy of ``x``.

:func:`enable_fused_lora` gives every eligible ``LoRALinear`` (no dropout, frozen full-precision base, no
bias, not disabled) a forward that computes ``x W^T + s (x A^T) B^T`` with the low-rank product
accumulated into the base output by ``addmm_`` and, in backward, ``g W + s (g B) A`` likewise, saving
exactly what torchtune's path saves (``x`` and ``x A^T``). Parameters, state-dict keys and the maths
are unchanged; the results differ by floating-point rounding only.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["enable_fused_lora", "lora_linear"]


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        out = (x2 @ weight.t()).addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scale = scale
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        scale = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ lora_b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gb, lora_a, alpha=scale).view(*grad.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_a = (gb.t() @ x2).mul_(scale)
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ xa).mul_(scale)
        return grad_x, None, grad_a, grad_b, None


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``x W^T + scale * (x A^T) B^T`` with a frozen ``W``, in one autograd op (see the module docstring).

    Args:
        x: ``[..., in_dim]``.
        weight: ``[out_dim, in_dim]`` frozen base weight (gets no gradient).
        lora_a: ``[rank, in_dim]``.
        lora_b: ``[out_dim, rank]``.
        scale: ``alpha / rank``.

    Returns:
        ``[..., out_dim]``.
    """
    return _LoRALinear.apply(x, weight, lora_a, lora_b, scale)


def _fused_forward(self: nn.Module, x: Tensor) -> Tensor:
    # Conditions that can change after enabling (disable_adapter, a trainable base) fall back per call.
    if self.disabled or self.weight.requires_grad:
        return type(self).forward(self, x)
    return lora_linear(x, self.weight, self.lora_a.weight, self.lora_b.weight, self.alpha / self.rank)


def enable_fused_lora(model: nn.Module) -> int:
    """Give every eligible ``LoRALinear`` of ``model`` the fused forward (in place, on the instances).

    Eligible: no dropout, a full-precision (not NF4) base without bias. Call it before ``torch.compile``,
    activation checkpointing and FSDP2 wrap the layers, like any other change to the modules.

    Args:
        model: A model with torchtune ``LoRALinear`` layers.

    Returns:
        How many layers now use the fused forward.
    """
    from torchtune.modules.peft import LoRALinear

    count = 0
    for module in model.modules():
        if (
            type(module) is LoRALinear
            and isinstance(module.dropout, nn.Identity)
            and not module._quantize_base
            and not module.use_bias
        ):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
