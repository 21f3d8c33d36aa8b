"""torchtune's RMSNorm and SwiGLU feed-forward with the same forward, keeping fewer tensors for backward.

Without activation checkpointing a decoder layer keeps what every op saves for its backward, and two of
torchtune's position-wise modules keep more than their gradients need:

* ``RMSNorm`` computes in float32 by upcasting its input and letting autograd record the decomposition of
  ``F.rms_norm``: it keeps the float32 input *and* the float32 normalised tensor (plus the inverse RMS),
  8 bytes per element for a bf16 model. Both gradients follow from the input, in its own dtype, and the
  inverse RMS: :class:`LeanRMSNorm` keeps those (2 bytes per element in bf16, 4 in float32) and rebuilds
  the normalised tensor in backward, one element-wise pass.
* ``FeedForward``'s ``silu(w1(x)) * w3(x)`` keeps the gate projection for SiLU's backward and the SiLU
  output and up projection for the product's: three ``intermediate_dim``-wide tensors. The SiLU output is
  one element-wise op of the gate: :class:`LeanFeedForward` keeps the gate and up projections only and
  recomputes SiLU in backward.

For Llama 3 8B in bf16 that is about 40% less per kept layer (norms 16 -> 4 bytes per token and hidden
unit, the MLP 21 -> 14), which is what lets the planner keep more layers out of recomputation on a GPU,
and shrinks a recomputed layer's rebuilt tensors alike. The forward is bit-identical to torchtune's on CPU
(the same ops in the same order, checked in ``tests/modules/test_lean_layers.py``); the gradients are
the same functions of the same tensors: SwiGLU's are autograd's own ops (``silu_backward``), the norm's
a closed form equal to autograd's up to float rounding.

Both run as plain ops where nothing is saved (no grad: evaluation, generation) and under ``torch.compile``,
whose partitioner already decides what to keep and recompute across the whole graph.
:func:`apply_lean_layers` re-classes the modules in place (same parameters and state-dict names), as
FSDP2's ``fully_shard`` and :mod:`longlora_tune.training.sequence_tiling` re-class the modules they change.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import FeedForward, RMSNorm

__all__ = ["LeanFeedForward", "LeanRMSNorm", "apply_lean_layers", "swiglu"]


def _keeps_graph(*tensors: Optional[torch.Tensor]) -> bool:
    # Saving is only worth a custom function when autograd records this op, and compile does its own.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # F.rms_norm's decomposition, op for op, at float32 or better: the output is torchtune's to the bit
    # (float64 stays float64, where torchtune would round to float32: the tests compare gradients there).
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((xf * rstd) * weight).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """``F.rms_norm(x.float(), weight) -> x.dtype`` keeping ``x`` and the float32 inverse RMS only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight, rstd = ctx.saved_tensors
        want_x, want_weight = ctx.needs_input_grad[:2]
        normed = x.to(rstd.dtype) * rstd
        g = grad.to(rstd.dtype)
        grad_weight = None
        if want_weight:
            grad_weight = (g * normed).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        grad_x = None
        if want_x:
            # d/dx of w * x * rstd(x): rstd * (g*w - normed * mean(g*w*normed)), in float32.
            gw = g.mul_(weight) if g is not grad else g * weight
            dot = (gw * normed).mean(-1, keepdim=True)
            grad_x = gw.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class _SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` keeping ``gate`` and ``up`` only (SiLU is recomputed in backward)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        # Into SiLU's own output: one MLP-wide tensor fewer to allocate (on CPU each new one is paged in).
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        gate, up = ctx.saved_tensors
        want_gate, want_up = ctx.needs_input_grad
        # Autograd's own ops for the product and SiLU, so the gradients are the unfused module's exactly.
        grad_up = F.silu(gate).mul_(grad) if want_up else None
        grad_gate = None
        if want_gate:
            grad_silu = grad * up
            grad_gate = torch.ops.aten.silu_backward.grad_input(grad_silu, gate, grad_input=grad_silu)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; under autograd it keeps only ``gate`` and ``up`` for backward.

    Args:
        gate: The gate projection's output.
        up: The up projection's output, shaped like ``gate``.

    Returns:
        The product, shaped like ``gate``.
    """
    if _keeps_graph(gate, up):
        return _SwiGLUFunction.apply(gate, up)
    return F.silu(gate) * up


class LeanRMSNorm(RMSNorm):
    """torchtune's ``RMSNorm`` (float32 inside) that keeps its input and inverse RMS for backward only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchtune's ``RMSNorm.forward``, saving less under autograd.

        Args:
            x: Tensor to normalise over its last dimension.

        Returns:
            The normalised and scaled tensor, in ``x``'s dtype.
        """
        if _keeps_graph(x, self.scale):
            return _RMSNormFunction.apply(x, self.scale, self.eps)
        return _rms_norm(x, self.scale, self.eps)[0]


class LeanFeedForward(FeedForward):
    """torchtune's SwiGLU ``FeedForward`` whose product keeps the gate and up projections only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``w2(silu(w1(x)) * w3(x))``, as torchtune's ``FeedForward``.

        Args:
            x: ``[..., in_dim]`` input.

        Returns:
            ``[..., out_dim]`` output.
        """
        return self.w2(swiglu(self.w1(x), self.w3(x)))


def apply_lean_layers(model: nn.Module) -> int:
    """Re-class torchtune's ``RMSNorm`` and SwiGLU ``FeedForward`` modules of ``model`` in place.

    Only exact torchtune classes are changed: a ``FeedForward`` qualifies with an up projection and
    ``nn.SiLU`` activation (every family here); subclasses (already lean, tiled, sharded) are left alone.

    Args:
        model: Any module.

    Returns:
        How many modules were re-classed.
    """
    changed = 0
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = LeanRMSNorm
        elif type(module) is FeedForward and module.w3 is not None and type(module.activation) is nn.SiLU:
            module.__class__ = LeanFeedForward
        else:
            continue
        changed += 1
    return changed
