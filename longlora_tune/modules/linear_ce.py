"""Output projection and cross-entropy in one chunked op that keeps no vocabulary-sized tensor for backward.

torchtune's ``CEWithChunkedOutputLoss`` upcasts one chunk of logits at a time, but autograd still keeps
every chunk's fp32 log-softmax until backward: ``4 x tokens x vocab`` bytes (11.9 GiB at 100k tokens with
Llama 2's 32000-token vocabulary), plus the compute-dtype logits. :func:`linear_cross_entropy` instead
computes, chunk by chunk in the forward pass, the logits, the loss and the loss's gradients with respect to
the hidden states (and the output weight when it trains, e.g. tied to trainable embeddings). Each chunk's
logits are freed before the next one is made; what survives to backward is one ``tokens x dim`` gradient.
Backward only scales it by the incoming gradient. The FLOPs are those of the unfused path (the output
matmul, and one matmul per gradient); nothing is recomputed.

Numerics follow the unfused path: logits in the compute dtype, log-sum-exp and softmax in fp32, the fp32
gradient of the mean loss cast to the compute dtype before the matmuls (as the backward of ``.float()``
does); the weight's gradient is accumulated in fp32 across chunks.

Using it as the recipe's ``loss``: :meth:`ChunkedLinearCrossEntropyLoss.set_model_output` makes the model
finish its forward with this loss whenever labels were handed over with
:meth:`~ChunkedLinearCrossEntropyLoss.scoring` (which :func:`longlora_tune.modules.loss.summed_token_loss`
does), so
the output weight is read inside the model's forward, where FSDP2 has gathered it. Without pending labels
the model returns logits as before (evaluation, generation).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from longlora_tune.errors import LongLoRAConfigError

__all__ = ["ChunkedLinearCrossEntropyLoss", "linear_cross_entropy"]


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` with its gradients computed in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, num_chunks: int, ignore_index: int
    ) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = labels != ignore_index
        # Softmax and accumulators in fp32 at least (fp64 inputs stay fp64).
        acc = torch.promote_types(hidden.dtype, torch.float32)
        # Mean over scored tokens; no scored token gives an exact 0 (not 0/0) and zero gradients.
        denom = valid.sum().clamp(min=1).to(acc)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        size = -(-hidden.shape[0] // num_chunks) if hidden.shape[0] else 1
        for start in range(0, hidden.shape[0], size):
            h, ok = hidden[start : start + size], valid[start : start + size]
            target = labels[start : start + size].where(ok, 0)[:, None]  # ignored rows read column 0
            logits = (h @ weight.t()).to(acc)
            picked = logits.gather(1, target)
            # Log-sum-exp in place (torch.logsumexp would allocate another fp32 chunk for exp(x - max)):
            # the logits become exp(logits - max), the softmax times its row sum.
            row_max = logits.amax(dim=-1, keepdim=True)
            row_sum = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            lse = row_sum.log().add_(row_max)
            total += ((lse - picked).squeeze(1) * ok).sum()
            if not (need_hidden or need_weight):
                del logits  # freed before the next chunk's logits exist, not when the name is rebound
                continue
            # d(mean loss)/d(logits) = (softmax - onehot(target)) / denom on scored rows, 0 elsewhere;
            # built in place in the fp32 chunk, which is not needed afterwards.
            grad = logits.div_(row_sum)
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad.mul_((ok / denom)[:, None])
            grad = grad.to(hidden.dtype)
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start : start + size])
            if need_weight:
                grad_weight += (grad.t() @ h).to(acc)
            # One chunk at a time: this chunk's fp32 logits and gradient go before the next chunk's are made.
            del logits, grad
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None)
        return total / denom

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice (retain_graph is not supported)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # the gradients were stored for this one backward; free them as they leave
        # In place: the stored gradients are this op's own and are not needed again.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, num_chunks: int = 8, ignore_index: int = -100
) -> Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` over the tokens whose label is not ignored.

    Equal to ``F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index)`` (0 when
    every label is ignored), without keeping logits or log-probabilities for backward (see the module
    docstring). ``retain_graph`` backward is not supported: the gradients are computed once, in forward.

    Args:
        hidden: ``[..., dim]`` final hidden states (after the final norm).
        weight: ``[vocab, dim]`` output projection weight.
        labels: ``[...]`` target token ids (already shifted for next-token prediction).
        num_chunks: How many token chunks the logits are made in (peak extra memory ``tokens / num_chunks
            x vocab x 6`` bytes in bf16: one chunk's fp32 logits and their bf16 copy or gradient).
        ignore_index: Label of tokens that are not scored.

    Returns:
        A 0-dim tensor, fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: On mismatched shapes or a chunk count below 1.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: hidden [..., dim], weight [vocab, dim] and labels [...] must match; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), num_chunks, ignore_index
    )


def _output_weight(output: Any) -> Tensor:
    """The weight of a torchtune model's output projection (``nn.Linear`` without bias or ``TiedLinear``)."""
    from torchtune.modules import TiedLinear

    if isinstance(output, TiedLinear):
        return output.tied_module.weight
    return output.weight


class ChunkedLinearCrossEntropyLoss(nn.Module):
    """The recipe's ``loss`` component for :func:`linear_cross_entropy` (torchtune's mean-loss convention).

    Config: ``loss: {_component_: longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss,
    num_output_chunks: 8}``. The recipe calls :meth:`set_model_output` once the model is built; the loss
    of a batch is then ``with loss_fn.scoring(labels): loss = model(tokens)`` (what
    :func:`longlora_tune.modules.loss.summed_token_loss` does). ``loss_fn(hidden, labels)`` also works on
    final
    hidden states passed in directly (outside FSDP2).

    Args:
        num_output_chunks: Token chunks the logits are made in (as in ``CEWithChunkedOutputLoss``).
        ignore_index: Label of tokens that are not scored.

    Raises:
        ValueError: If ``num_output_chunks`` < 1.
    """

    #: Tells :func:`longlora_tune.modules.loss.summed_token_loss` that the model's forward returns the loss.
    fuses_output_projection = True

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100) -> None:
        super().__init__()
        if num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be >= 1, got {num_output_chunks}")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self._output: Any = None
        self._pending: Tensor | None = None

    def set_model_output(self, model: nn.Module) -> None:
        """Make ``model`` (a torchtune ``TransformerDecoder``) end its forward with this loss while scoring.

        The model's ``unembed`` (final norm + output projection) is replaced on the instance: inside
        :meth:`scoring` it returns the mean loss of the pending labels, otherwise what torchtune's returns.
        Parameters and state-dict keys do not change.

        Args:
            model: The decoder, before or after FSDP2 sharding and activation checkpointing.

        Raises:
            LongLoRAConfigError: If the output projection is not a bias-free ``nn.Linear`` or a
                ``TiedLinear`` (a LoRA or NF4 output layer needs torchtune's ``CEWithChunkedOutputLoss``).
        """
        from torchtune.modules import TiedLinear

        output = getattr(model, "output", None)
        plain = type(output) is nn.Linear and output.bias is None
        if not (plain or isinstance(output, TiedLinear)) or not hasattr(model, "norm"):
            raise LongLoRAConfigError(
                f"loss ChunkedLinearCrossEntropyLoss needs a model whose output layer is a bias-free "
                f"nn.Linear or TiedLinear, got {type(output).__name__}; use "
                "torchtune.modules.loss.CEWithChunkedOutputLoss"
            )
        self._output = output
        loss_ref, model_ref = weakref.ref(self), weakref.ref(model)
        torchtune_unembed = type(model).unembed

        def unembed(h: Tensor) -> Any:
            loss, owner = loss_ref(), model_ref()
            if loss is None or loss._pending is None:
                return torchtune_unembed(owner, h)
            # Here, inside the model's forward, FSDP2 has gathered the output weight.
            return loss(owner.norm(h), loss._pending)

        model.unembed = unembed

    @contextlib.contextmanager
    def scoring(self, labels: Tensor) -> Iterator[None]:
        """While active, the model's forward returns the mean loss against ``labels`` instead of logits.

        Args:
            labels: ``[batch, seq]`` next-token targets (already shifted).

        Yields:
            Nothing.

        Raises:
            RuntimeError: If :meth:`set_model_output` was not called.
        """
        if self._output is None:
            raise RuntimeError("ChunkedLinearCrossEntropyLoss.scoring needs set_model_output(model) first")
        self._pending = labels
        try:
            yield
        finally:
            self._pending = None

    def forward(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the model's output projection of ``hidden`` against ``labels``.

        Args:
            hidden: ``[..., dim]`` final hidden states (after the final norm).
            labels: ``[...]`` next-token targets.

        Returns:
            A 0-dim fp32 tensor (0 when every label is ignored).

        Raises:
            RuntimeError: If :meth:`set_model_output` was not called.
        """
        if self._output is None:
            raise RuntimeError("ChunkedLinearCrossEntropyLoss needs set_model_output(model) first")
        return linear_cross_entropy(
            hidden,
            _output_weight(self._output),
            labels,
            num_chunks=self.num_output_chunks,
            ignore_index=self.ignore_index,
        )
