"""The training DataLoader: resumable sampler, and the collate that fits the data and S² attention."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torchtune.data import padded_collate_packed

from longlora_tune._compat import import_object
from longlora_tune.data.sampler import ResumableDistributedSampler
from longlora_tune.errors import LongLoRAConfigError

__all__ = ["DEFAULT_COLLATE", "build_dataloader", "pad_multiple"]

#: The collate a config gets without ``collate_fn``.
DEFAULT_COLLATE = "longlora_tune.data.padded_collate_s2"


def pad_multiple(
    configured: Optional[int],
    group_size: Optional[int],
    train_len: int,
    *,
    context_parallel_degree: int = 1,
) -> Optional[int]:
    """What padded batch lengths are rounded up to.

    ``pad_to_multiple_of`` when set, else the S² group size (whole groups; None with full attention). With
    context parallelism of degree ``P`` it is raised to a multiple of ``P * G/2`` as well, so that each
    rank's slice is whole half-groups (what the halo exchange needs). It must divide the training length,
    so padding never makes a batch longer than the model accepts.

    Args:
        configured: the config's ``pad_to_multiple_of`` (None = the group size).
        group_size: the model's S² group size (None with full attention).
        train_len: the training sequence length (0 when unknown).
        context_parallel_degree: ranks sharing one sequence (1 = none).

    Returns:
        The multiple, or None for no rounding.

    Raises:
        LongLoRAConfigError: if the multiple does not divide ``train_len``.
    """
    multiple = group_size if configured is None else int(configured)
    if context_parallel_degree > 1 and group_size is not None:
        # Right padding after the last real token changes no real token's result (S² is causal).
        multiple = math.lcm(multiple or 1, context_parallel_degree * group_size // 2)
    if multiple is not None and train_len and train_len % multiple:
        raise LongLoRAConfigError(
            f"pad_to_multiple_of={multiple} does not divide the training length {train_len}; "
            "use a divisor of it (null = the S2 group size)"
        )
    return multiple


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    global_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool = True,
    packed: bool = False,
    collate_fn: str = DEFAULT_COLLATE,
    pad_to_multiple_of: Optional[int] = None,
    pad_id: int = 0,
    ignore_index: int = -100,
    num_workers: int = 0,
) -> tuple[DataLoader, ResumableDistributedSampler]:
    """The DataLoader of one rank and its resumable sampler.

    Args:
        dataset: map-style dataset (pretraining blocks, SFT samples, or a torchtune ``PackedDataset``).
        batch_size: sequences per micro-batch on this rank.
        global_batch_size: sequences per optimizer step over all ranks (the sampler yields whole steps).
        rank: this rank.
        world_size: number of ranks.
        seed: data-order seed (also seeds the loader's own generator, per rank).
        shuffle: permute each epoch.
        packed: rows are packs of several samples: torchtune's packed collate adds per-document
            ``input_pos`` and a document ``mask``.
        collate_fn: dotted path of the collate for unpacked data; it receives ``ignore_idx`` and, if it takes
            them, ``pad_id`` and ``pad_to_multiple_of``.
        pad_to_multiple_of: from :func:`pad_multiple`.
        pad_id: the tokenizer's padding id.
        ignore_index: the loss's ignore index (label padding).
        num_workers: DataLoader worker processes.

    Returns:
        ``(dataloader, sampler)``; call ``sampler.set_position(epoch, position)`` before iterating.
    """
    sampler = ResumableDistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        global_batch_size=global_batch_size,
        shuffle=shuffle,
        seed=seed,
    )
    if packed:
        # Rows are already max_seq_len long; the collate adds per-document input_pos and a document mask.
        collate: Callable = padded_collate_packed
    else:
        fn = import_object(collate_fn)
        params = inspect.signature(fn).parameters
        kwargs: dict[str, Any] = {"ignore_idx": ignore_index}
        if "pad_id" in params:
            kwargs["pad_id"] = pad_id
        if "pad_to_multiple_of" in params:
            kwargs["pad_to_multiple_of"] = pad_to_multiple_of
        collate = partial(fn, **kwargs)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=True,
        num_workers=num_workers,
        # Its own generator: each new iterator draws a worker seed, which from the global RNG would
        # shift the dropout stream of a run resumed mid-epoch.
        generator=torch.Generator().manual_seed(seed + rank),
    )
    return loader, sampler
