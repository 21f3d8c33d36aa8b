"""A one-line error when an evaluation length does not fit one GPU.

The evaluation recipes score each window (perplexity) or prompt (passkey) on ONE device with full
attention: unlike training they do not split a sequence across GPUs (no context parallelism; several
processes split the windows, not the sequence). Full attention is linear in memory with SDPA/flash, but
the activations of one layer, the KV cache and the chunked logits of a 256k-token window exceed what some
GPUs hold; the CUDA out-of-memory traceback is replaced by the length and the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from longlora_tune.errors import LongLoRAConfigError

__all__ = ["eval_length_must_fit"]


@contextlib.contextmanager
def eval_length_must_fit(length: int, fix: str) -> Iterator[None]:
    """Turn an out-of-memory error while scoring ``length`` tokens into a one-line config error.

    Args:
        length: tokens of the window or prompt being scored.
        fix: what the user can change, e.g. ``"lower eval_lengths or raise logits_chunks"``.

    Yields:
        Nothing.

    Raises:
        LongLoRAConfigError: when the body runs out of device memory.
    """
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise LongLoRAConfigError(
            f"evaluating {length} tokens ran out of device memory: the eval recipes run each sequence on one "
            f"GPU with full attention (no context parallelism); {fix}, or use a GPU with more memory"
        ) from e
