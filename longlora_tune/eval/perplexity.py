"""Sliding-window perplexity, the protocol of LongLoRA's ``eval.py`` (docs/reference.md).

Protocol, for one evaluation length ``L`` over a token stream of ``n`` tokens:

* window starts are ``range(0, n - L, stride)`` (stride 256) with the LAST start dropped, as the
  reference does (``all_ix.pop()``); each window is the ``L`` tokens ``stream[s : s + L]``;
* every window is scored in full: the model reads all ``L`` tokens and the loss is the mean
  cross-entropy of its ``L - 1`` next-token predictions (not only the last ``stride`` tokens);
* the reported loss is the mean over windows of the per-window mean loss, and PPL = exp(loss). The
  token-weighted variant (sum of all token losses / number of predicted tokens, what
  ``eval_distributed.py`` reports) is reported too; with equal-length windows the two agree up to
  rounding.

Edge cases (chosen and documented here, tested in ``tests/eval``):

* a stream too short for any window at length ``L`` (``n <= L + stride``, because of the dropped last
  start) is NOT evaluated as a shorter window, which would silently report another length's
  perplexity: that length is reported as skipped with the reason, and the other lengths still run;
* the partial window at the end of the stream (tokens after the last window start) is never scored:
  every window has exactly ``L`` tokens;
* ``max_windows`` keeps that many starts spread evenly over the whole stream (first and last included),
  so a bounded run still samples every part of the data instead of only its beginning.

Data sources (:func:`load_token_stream`): a pre-tokenized ``uint16`` ``.bin`` stream (PG19 /
proof-pile files of the reference, read with ``np.memmap`` after :func:`read_token_bin` checks that it is
one: non-empty, even size, not text, ids below the vocabulary), local text files (``.txt`` read whole,
``.jsonl``/``.json`` records with a text column), or a Hugging Face hub dataset. Text is tokenized with
the config's tokenizer: every document as BOS + text + EOS, documents concatenated into one stream.

Distributed: under torchrun every rank scores the windows ``starts[rank::world_size]`` and the sums are
all-reduced, so every rank ends with the same numbers.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.eval.decoding import drop_kv_caches
from longlora_tune.eval.memory import eval_length_must_fit

__all__ = [
    "PerplexityResult",
    "evaluate_perplexity",
    "load_token_stream",
    "max_token_id",
    "read_token_bin",
    "score_window",
    "select_windows",
    "skip_reason",
    "window_starts",
]


@dataclass
class PerplexityResult:
    """Perplexity at one evaluation length.

    Attributes:
        eval_length: window length ``L`` in tokens.
        num_windows: windows scored (over all ranks).
        num_tokens: next-token predictions scored (``num_windows * (L - 1)``).
        loss: mean over windows of the per-window mean loss (the reference's score).
        perplexity: ``exp(loss)``.
        token_loss: token-weighted mean loss.
        token_perplexity: ``exp(token_loss)``.
        skipped: reason the length was not evaluated, or None.
    """

    eval_length: int
    num_windows: int = 0
    num_tokens: int = 0
    loss: float = float("nan")
    perplexity: float = float("nan")
    token_loss: float = float("nan")
    token_perplexity: float = float("nan")
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/CSV (NaN for skipped lengths)."""
        return asdict(self)


def window_starts(num_tokens: int, window_len: int, stride: int = 256, drop_last: bool = True) -> list[int]:
    """Start offsets of the evaluation windows.

    Args:
        num_tokens: length of the token stream.
        window_len: window length ``L``.
        stride: distance between window starts.
        drop_last: drop the last start, as LongLoRA's ``eval.py`` does.

    Returns:
        ``list(range(0, num_tokens - window_len, stride))`` without its last element when ``drop_last``.

    Raises:
        ValueError: if ``window_len`` < 2 or ``stride`` < 1.
    """
    if window_len < 2:
        raise ValueError(f"window length must be >= 2 (one prediction needs two tokens), got {window_len}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    starts = list(range(0, num_tokens - window_len, stride))
    if drop_last and starts:
        starts.pop()
    return starts


def skip_reason(num_tokens: int, window_len: int, stride: int = 256, drop_last: bool = True) -> str | None:
    """Why a stream of ``num_tokens`` tokens has no window of ``window_len`` tokens, or None when it has one.

    Args:
        num_tokens: tokens in the stream.
        window_len: the evaluation length.
        stride: distance between window starts.
        drop_last: the last start is dropped (the reference's rule).

    Returns:
        The reason the length is skipped, naming the tokens it needs, or None.
    """
    if window_starts(num_tokens, window_len, stride, drop_last):
        return None
    if drop_last:
        need = window_len + stride + 1
        why = f"one window of {window_len} tokens plus the dropped last start at stride {stride}"
    else:
        need, why = window_len + 1, f"one window of {window_len} tokens and the token after it"
    return f"the data has {num_tokens} tokens; length {window_len} needs at least {need} ({why})"


def select_windows(starts: Sequence[int], max_windows: int | None) -> list[int]:
    """Keep at most ``max_windows`` starts, spread evenly over the stream (first and last kept).

    Args:
        starts: all window starts, ascending.
        max_windows: bound, or None for all.

    Returns:
        The kept starts, ascending.

    Raises:
        ValueError: if ``max_windows`` < 1.
    """
    if max_windows is None or len(starts) <= max_windows:
        return list(starts)
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or null, got {max_windows}")
    if max_windows == 1:
        return [starts[0]]
    last = len(starts) - 1
    return [starts[round(i * last / (max_windows - 1))] for i in range(max_windows)]


def score_window(model: nn.Module, tokens: torch.Tensor, *, logits_chunks: int = 8) -> tuple[float, int]:
    """Sum of next-token cross-entropies over one window, computed in float32.

    The output projection is applied in ``logits_chunks`` chunks (torchtune's
    ``set_num_output_chunks``) so that fp32 logits never exist for the whole window at once (a 100k-token
    window would need 12.8 GB of fp32 logits for Llama 2's vocabulary).

    Args:
        model: torchtune decoder in eval mode.
        tokens: ``[L]`` token ids on the model's device.
        logits_chunks: number of output chunks (1 = no chunking).

    Returns:
        ``(sum of token losses, number of predicted tokens)`` where the count is ``L - 1``.
    """
    inputs = tokens[None, :-1]
    labels = tokens[None, 1:]
    drop_kv_caches(model)
    previous = getattr(model, "num_output_chunks", 0)
    chunks = max(1, min(logits_chunks, inputs.shape[1]))
    model.set_num_output_chunks(chunks)
    try:
        outputs = model(inputs)
    finally:
        model.set_num_output_chunks(previous)
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    label_chunks = labels.chunk(len(outputs), dim=1)
    total = 0.0
    for logits, target in zip(outputs, label_chunks, strict=True):
        total += F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum").item()
    return total, labels.numel()


def evaluate_perplexity(
    model: nn.Module,
    stream: np.ndarray | torch.Tensor,
    eval_lengths: Iterable[int],
    *,
    stride: int = 256,
    max_windows: int | None = None,
    drop_last: bool = True,
    device: torch.device | str = "cpu",
    logits_chunks: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    on_result: Callable[[PerplexityResult], None] | None = None,
) -> list[PerplexityResult]:
    """Sliding-window perplexity at every evaluation length (see the module docstring for the protocol).

    Args:
        model: torchtune decoder in eval mode (full attention), ``max_seq_len`` >= the largest length.
        stream: 1-D token ids (``np.memmap`` of a ``.bin`` file, array or tensor).
        eval_lengths: window lengths, e.g. ``[2048, 4096, 8192]``.
        stride: distance between window starts (reference: 256).
        max_windows: at most this many windows per length (evenly spread), None for all.
        drop_last: drop the last window start as the reference does.
        device: device of the model.
        logits_chunks: output projection chunks per window (memory bound for long windows).
        rank: this process's rank (windows ``rank::world_size`` are scored here).
        world_size: number of processes; sums are all-reduced when > 1.
        progress: show a progress bar (rank 0 only).
        on_result: called with each length's result as soon as it is done, so a caller keeps the finished
            lengths of a run that is stopped part-way (:class:`~longlora_tune.eval.sweep.Sweep`).

    Returns:
        One :class:`PerplexityResult` per evaluation length, in the given order.

    Raises:
        ValueError: for a non-1-D stream or an evaluation length above the model's ``max_seq_len``.
        LongLoRAConfigError: for a token id outside the model's vocabulary.
    """
    if stream.ndim != 1:
        raise ValueError(f"the token stream must be 1-D, got shape {tuple(stream.shape)}")
    n = int(stream.shape[0])
    embedding = getattr(model, "tok_embeddings", None)
    if isinstance(embedding, nn.Embedding) and n:
        # An id past the embedding table would end in an IndexError inside the first window.
        largest = max_token_id(stream)
        if largest >= embedding.num_embeddings:
            raise LongLoRAConfigError(
                f"the token stream holds id {largest} but the model's vocabulary has "
                f"{embedding.num_embeddings} ids; the data was not tokenized with this model's tokenizer"
            )
    device = torch.device(device)
    max_len = getattr(model, "max_seq_len", None)
    results = []
    for length in eval_lengths:
        length = int(length)
        if max_len is not None and length - 1 > max_len:
            raise ValueError(f"eval length {length} exceeds the model's max_seq_len {max_len}")
        skipped = skip_reason(n, length, stride, drop_last)
        if skipped is None:
            starts = select_windows(window_starts(n, length, stride, drop_last), max_windows)
            result = _score_length(
                model,
                stream,
                length,
                starts[rank::world_size],
                device=device,
                logits_chunks=logits_chunks,
                world_size=world_size,
                progress=progress and rank == 0,
            )
        else:
            result = PerplexityResult(eval_length=length, skipped=skipped)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _score_length(
    model: nn.Module,
    stream: np.ndarray | torch.Tensor,
    length: int,
    starts: Sequence[int],
    *,
    device: torch.device,
    logits_chunks: int,
    world_size: int,
    progress: bool,
) -> PerplexityResult:
    """Score this rank's windows of one length and all-reduce the sums over ``world_size`` ranks.

    Args:
        model: the evaluation model.
        stream: 1-D token ids.
        length: the window length.
        starts: this rank's window starts.
        device: device of the model.
        logits_chunks: output projection chunks per window.
        world_size: number of processes; sums are all-reduced when > 1.
        progress: show a progress bar.

    Returns:
        The length's :class:`PerplexityResult` over all ranks.
    """
    # [sum of per-window mean losses, windows, sum of token losses, tokens], float64 for exact sums.
    sums = torch.zeros(4, dtype=torch.float64)
    bar = tqdm(starts, desc=f"ppl@{length}", disable=not progress, unit="win")
    for s in bar:
        window = torch.as_tensor(np.asarray(stream[s : s + length], dtype=np.int64), device=device)
        with (
            torch.inference_mode(),
            eval_length_must_fit(length, "lower eval_lengths or raise logits_chunks"),
        ):
            loss_sum, count = score_window(model, window, logits_chunks=logits_chunks)
        sums += torch.tensor([loss_sum / count, 1.0, loss_sum, count], dtype=torch.float64)
        bar.set_postfix(ppl=f"{math.exp(sums[0].item() / sums[1].item()):.3f}")
    if world_size > 1:
        reduce_on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        buf = sums.to(reduce_on)
        torch.distributed.all_reduce(buf)
        sums = buf.cpu()
    mean_loss = sums[0].item() / sums[1].item()
    token_loss = sums[2].item() / sums[3].item()
    return PerplexityResult(
        eval_length=length,
        num_windows=int(sums[1].item()),
        num_tokens=int(sums[3].item()),
        loss=mean_loss,
        perplexity=math.exp(mean_loss),
        token_loss=token_loss,
        token_perplexity=math.exp(token_loss),
    )


# Bytes read from the start of a .bin file to tell a text file from a token stream.
_TEXT_SNIFF_BYTES = 64 * 1024
# Token ids scanned per step when checking a stream against the vocabulary (bounded memory for big files).
_SCAN_TOKENS = 1 << 24


def _looks_like_text(sample: bytes) -> bool:
    """Whether ``sample`` reads as UTF-8 text: only printable characters and whitespace.

    A uint16 token stream fails this almost surely: its low bytes are spread over all 256 values (control
    bytes and invalid UTF-8 included) and BOS (id 1) alone is the control bytes ``01 00``.
    """
    if len(sample) < 64:  # too few bytes to tell; the size and id checks still apply
        return False
    try:
        # final=False: a multi-byte character cut at the end of the sample is not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return False
    text = text.removeprefix("\ufeff")
    return all(ch.isprintable() or ch.isspace() for ch in text)


def max_token_id(stream: np.ndarray | torch.Tensor) -> int:
    """Largest token id of a 1-D stream, scanned in slices so a memory-mapped file is never copied whole.

    Args:
        stream: token ids (``np.memmap``, array or tensor); must not be empty.

    Returns:
        The largest id.
    """
    if isinstance(stream, torch.Tensor):
        return int(stream.max().item())
    return max(int(np.max(stream[i : i + _SCAN_TOKENS])) for i in range(0, len(stream), _SCAN_TOKENS))


def read_token_bin(path: str | Path, *, vocab_size: int | None = None) -> np.ndarray:
    """Open a pre-tokenized ``uint16`` token stream (LongLoRA's pg19 / proof-pile ``.bin`` format).

    The file is checked before anything reads windows from it, so a wrong file ends with one line naming
    it instead of an ``IndexError`` deep in the model: it must exist, be non-empty, not be a text file,
    have an even size (2 bytes per token) and, with ``vocab_size``, hold only ids below it (an id out of
    range means the file was made with another tokenizer, or is not a token stream at all).

    Args:
        path: the ``.bin`` file.
        vocab_size: the tokenizer's (or model's) vocabulary size; None skips the id check.

    Returns:
        A read-only ``np.memmap`` of ``uint16`` token ids.

    Raises:
        LongLoRAConfigError: if any check fails; the message names the file and the fix.
    """
    file = Path(path)
    if not file.is_file():
        raise LongLoRAConfigError(
            f"dataset.path={str(file)!r} does not exist; give a uint16 token stream such as "
            "pg19/test.bin or proof-pile/test_sampled_data.bin"
        )
    size = file.stat().st_size
    if size == 0:
        raise LongLoRAConfigError(
            f"dataset.path={str(file)!r} is empty (0 bytes); give a non-empty uint16 token stream "
            "(e.g. pg19/test.bin)"
        )
    with file.open("rb") as f:
        sample = f.read(_TEXT_SNIFF_BYTES)
    if _looks_like_text(sample):
        raise LongLoRAConfigError(
            f"dataset.path={str(file)!r} is a text file, not a uint16 token stream; "
            "evaluate it with dataset.source=text (it is tokenized with the config's tokenizer)"
        )
    if size % 2:
        raise LongLoRAConfigError(
            f"dataset.path={str(file)!r} has an odd size ({size} bytes), so it is not a uint16 token "
            "stream (2 bytes per token); give a .bin of numpy uint16 ids, or use dataset.source=text for text"
        )
    stream = np.memmap(file, dtype=np.uint16, mode="r")
    if vocab_size is not None:
        largest = max_token_id(stream)
        if largest >= int(vocab_size):
            raise LongLoRAConfigError(
                f"dataset.path={str(file)!r} holds token id {largest} but the vocabulary has {vocab_size} "
                "ids, so it is not a uint16 token stream of this tokenizer; tokenize the data with the "
                "model's tokenizer, or use dataset.source=text for text"
            )
    return stream


def _read_text_documents(path: Path, column: str) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if column not in record:
                    raise LongLoRAConfigError(
                        f"{path}:{line_no} has no {column!r} field; set dataset.column to the text field"
                    )
                docs.append(record[column])
        return docs
    if path.suffix == ".json":
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not all(isinstance(r, dict) and column in r for r in records):
            raise LongLoRAConfigError(f"{path} must be a JSON list of objects with a {column!r} field")
        return [r[column] for r in records]
    return [path.read_text()]


def _tokenize_documents(tokenizer: Any, docs: Iterable[str]) -> np.ndarray:
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, add_bos=True, add_eos=True))
    return np.asarray(ids, dtype=np.int64)


def load_token_stream(
    *,
    source: str,
    path: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    column: str = "text",
    name: str | None = None,
    subset: str | None = None,
    split: str = "test",
    data_files: str | Sequence[str] | None = None,
    max_documents: int | None = None,
    vocab_size: int | None = None,
) -> np.ndarray:
    """Load the evaluation token stream.

    Args:
        source: ``"bin"`` (pre-tokenized uint16 stream), ``"text"`` (local ``.txt``/``.jsonl``/``.json``
            files) or ``"hf"`` (a Hugging Face hub dataset, needs network or a local cache).
        path: the ``.bin`` file, or one or more text files.
        tokenizer: tokenizer with ``encode(text, add_bos, add_eos)`` (text and hub sources).
        column: text field of ``.jsonl``/``.json`` records and hub datasets.
        name: hub dataset name (``source="hf"``), e.g. ``"emozilla/pg19-test"``.
        subset: hub dataset configuration name.
        split: hub dataset split.
        data_files: data files for a hub loader (e.g. ``name="json"`` with local or ``hf://`` files).
        max_documents: use only the first documents (text and hub sources).
        vocab_size: for ``"bin"``: every token id must be below this (default: the tokenizer's
            ``vocab_size`` when a tokenizer is given; no id check without either).

    Returns:
        1-D array of token ids (a read-only ``np.memmap`` for ``.bin``).

    Raises:
        LongLoRAConfigError: for an unknown source, missing files, a ``.bin`` file that is not a uint16
            token stream of this tokenizer (see :func:`read_token_bin`) or a missing tokenizer.
    """
    if source == "bin":
        if path is None or not isinstance(path, (str, Path)):
            raise LongLoRAConfigError("dataset.path must name one .bin file for dataset.source=bin")
        limit = vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", None)
        return read_token_bin(path, vocab_size=limit)
    if source not in ("text", "hf"):
        raise LongLoRAConfigError(f"dataset.source={source!r} is not one of bin, text, hf")
    if tokenizer is None:
        raise LongLoRAConfigError(f"dataset.source={source} needs a tokenizer in the config")
    if source == "text":
        paths = [path] if isinstance(path, (str, Path)) else list(path or [])
        if not paths:
            raise LongLoRAConfigError("dataset.path must name one or more text files for dataset.source=text")
        docs: list[str] = []
        for p in paths:
            if not Path(p).is_file():
                raise LongLoRAConfigError(f"dataset.path entry {str(p)!r} does not exist")
            docs.extend(_read_text_documents(Path(p), column))
    else:
        if not name:
            raise LongLoRAConfigError("dataset.name must name a hub dataset for dataset.source=hf")
        from datasets import load_dataset

        ds = load_dataset(name, subset, split=split, data_files=data_files)
        if column not in ds.column_names:
            raise LongLoRAConfigError(
                f"hub dataset {name} has no column {column!r} (columns: {ds.column_names}); "
                "set dataset.column"
            )
        if max_documents is not None:
            ds = ds.select(range(min(max_documents, len(ds))))
        docs = list(ds[column])
    return _tokenize_documents(tokenizer, docs[:max_documents] if max_documents is not None else docs)
