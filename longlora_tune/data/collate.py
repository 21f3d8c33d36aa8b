"""Batch collation for S²-Attn training.

Right padding, no attention mask
    :func:`padded_collate_s2` pads on the right only (tokens with ``pad_id``, labels with ``ignore_idx``) and
    returns no mask. With the no-wrap S²-Attn used in training (and with full causal attention), a real
    token at position ``q < n`` only attends keys at positions ``<= q`` of its own group, all of which are
    real tokens: pad keys sit after every real token, so causality hides them from every real query, in every
    layer. Pad positions compute garbage, but their labels are ignored and nothing real reads them. (The
    wrap-around variant moves the first half-group to the end of the sequence, where it would see the pads;
    that is why padding is only safe with ``wrap_around=False``.) Left padding would put pads before real
    tokens and shift the S² group boundaries, so it is never used for training.

Rounding to a multiple of the group size
    ``pad_to_multiple_of`` rounds the padded length up to a multiple of the S² group size ``G`` (or any
    multiple of it), so every group is full: the reference requires ``n % G == 0`` and the flash/flex
    kernels run fastest on full groups. The S² attention itself also accepts a shorter last group.

Packing
    For many short samples, pack them into ``max_seq_len`` rows instead: set ``packed: True`` on a dataset
    builder that supports it (e.g. :func:`longlora_tune.data.longalpaca_dataset`), which wraps the samples in
    torchtune's ``PackedDataset``; the recipe then collates with ``torchtune.data.padded_collate_packed``
    (as torchtune recipes do when ``dataset.packed`` is true), which adds ``input_pos`` (positions restart
    per document) and a document-causal ``mask`` (a dense bool ``[b, s, s]`` on CPU, a flex ``BlockMask``
    on CUDA). S²-Attn ANDs that mask with its group pattern, so documents never see each other. Rows are
    already ``max_seq_len`` long; make ``max_seq_len`` a multiple of ``G``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


def padded_collate_s2(
    batch: Sequence[Mapping[str, Any]],
    *,
    pad_id: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: Optional[int] = None,
    padding_idx: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Right-pad ``tokens``/``labels`` of a batch to a common length, optionally a multiple of ``G``.

    Args:
        batch: samples with equal-length ``tokens`` and ``labels`` (lists or 1-D tensors of ints).
        pad_id: token id of padding.
        ignore_idx: label of padding (the loss's ignore index).
        pad_to_multiple_of: round the padded length up to a multiple of this (the S² group size or a
            multiple of it); ``None`` pads to the longest sample only.
        padding_idx: torchtune recipes' name for ``pad_id`` (they call the collate with
            ``padding_idx=tokenizer.pad_id``); overrides ``pad_id`` when given.

    Returns:
        ``{"tokens": LongTensor[b, n], "labels": LongTensor[b, n]}``.

    Raises:
        ValueError: for an empty batch, a sample whose tokens and labels differ in length, or a
            non-positive ``pad_to_multiple_of``.
    """
    if padding_idx is not None:
        pad_id = padding_idx
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r} must be a positive integer or None")
    tokens = [torch.as_tensor(s["tokens"], dtype=torch.long) for s in batch]
    labels = [torch.as_tensor(s["labels"], dtype=torch.long) for s in batch]
    for i, (t, lab) in enumerate(zip(tokens, labels)):
        if t.ndim != 1 or t.shape != lab.shape:
            raise ValueError(
                f"sample {i}: tokens {tuple(t.shape)} and labels {tuple(lab.shape)} must be equal-length 1-D"
            )
    n = max(t.numel() for t in tokens)
    if pad_to_multiple_of is not None:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    out_tokens = torch.full((len(batch), n), pad_id, dtype=torch.long)
    out_labels = torch.full((len(batch), n), ignore_idx, dtype=torch.long)
    for i, (t, lab) in enumerate(zip(tokens, labels)):
        out_tokens[i, : t.numel()] = t
        out_labels[i, : lab.numel()] = lab
    return {"tokens": out_tokens, "labels": out_labels}
