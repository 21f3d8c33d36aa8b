"""The training loss of one batch, as a token sum (so micro-batches and ranks normalise exactly).

torchtune 0.6.1 datasets keep ``labels`` aligned with ``tokens``; the shift by one happens here, in one
place, for continued pretraining, padded SFT and packed SFT alike.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["shift_labels", "summed_token_loss"]


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets for next-token prediction: ``labels[:, 1:]`` with ``ignore_index`` appended.

    Args:
        labels: ``[batch, seq]`` labels aligned with the input tokens.
        ignore_index: the loss's ignore index (the last position has no target).

    Returns:
        The shifted labels, same shape.
    """
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)


def summed_token_loss(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: dict[str, torch.Tensor],
    *,
    device: torch.device,
    ignore_index: int,
    context: Any = None,
    labels_shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one batch and return the SUM of its token losses and the number of scored tokens.

    A mean loss per micro-batch would weight a short batch like a long one; the sum, divided later by the
    global token count, gives the same gradient however the global batch is split.

    Args:
        model: the decoder (returns logits, or a list of chunks with a chunked loss).
        loss_fn: a torchtune/torch cross-entropy with mean reduction over non-ignored tokens, or a
            :class:`longlora_tune.modules.linear_ce.ChunkedLinearCrossEntropyLoss` set on ``model``
            (``set_model_output``), which computes the projection and the loss inside the forward.
        batch: ``tokens`` and ``labels``; packed batches add ``mask`` (document mask) and ``input_pos``.
        device: where the model runs.
        ignore_index: the loss's ignore index.
        context: a context manager around the forward (activation offloading); None for none.
        labels_shifted: ``batch["labels"]`` are already the next-token targets (a context-parallel slice,
            shifted before the split so that its last token keeps its target); they are not shifted again.

    Returns:
        ``(loss_sum, n_tokens)``: a differentiable scalar and an int64 scalar.
    """
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    if not labels_shifted:
        labels = shift_labels(labels, ignore_index)
    n_tokens = (labels != ignore_index).sum()
    # Packed batches: positions restart per document, and the document mask is ANDed with S².
    extra = {k: batch[k].to(device) for k in ("mask", "input_pos") if k in batch}
    if getattr(loss_fn, "fuses_output_projection", False):
        # longlora_tune.modules.linear_ce: the model's forward ends with the loss (the output weight is read
        # there,
        # where FSDP2 has gathered it) and returns the mean over scored tokens, an exact 0 when none is.
        with context if context is not None else contextlib.nullcontext(), loss_fn.scoring(labels):
            loss = model(tokens, **extra)
        return loss * n_tokens, n_tokens
    with context if context is not None else contextlib.nullcontext():
        logits = model(tokens, **extra)
    if int(n_tokens) == 0:
        # No scored token (a context-parallel slice of padding, say): the mean loss would be 0/0 = NaN and
        # poison the gradients. Return an exact zero that still runs backward through the model, since
        # FSDP's gradient reduction and the context-parallel halo exchange need every rank's backward.
        chunks = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        return sum(c.sum() for c in chunks) * 0.0, n_tokens
    if isinstance(logits, torch.Tensor):
        # An unchunked loss (e.g. torch.nn.CrossEntropyLoss) takes [tokens, vocab] logits.
        logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    return loss_fn(logits, labels) * n_tokens, n_tokens
