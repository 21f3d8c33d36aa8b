"""Continued-pretraining data: documents joined with EOS and cut into fixed-length blocks.

Block format (ours, deliberately not the reference's)
    Every document is encoded on its own without BOS and followed by EOS; the documents, in dataset order,
    form one token stream ``d1 </s> d2 </s> d3 </s> ...``. Block ``i`` is
    ``[BOS] + stream[i*(L-1):(i+1)*(L-1)]`` for ``block_size=L`` (``add_bos=True``, the default), or
    ``stream[i*L:(i+1)*L]`` with ``add_bos=False``.
    The tail that does not fill a block is dropped, so every block is exactly ``L`` tokens, none is padded
    and no label is ignored. ``labels == tokens`` (torchtune 0.6.1 recipes shift labels themselves).
    There is no document mask: as in the paper, attention runs across document boundaries within a block.

    The reference (LongLoRA ``fine-tune.py``) joins each map batch of 1000 documents with EOS, tokenizes the
    string (one BOS per 1000 documents), pads it to a multiple of ``L`` and reshapes it into rows, so most
    rows start without BOS and each batch's last row is padded. We start every block with BOS because
    Llama 2 always saw BOS at position 0 and every prompt at inference starts with it; it costs one token in
    ``L`` and is never a target (the recipe's label shift drops position 0's label).

Tokenized cache
    The token stream (not the blocks) is stored as a raw ``uint16``/``uint32`` file in ``cache_dir``, named by
    a hash of (format version, source, revision, data files with their size and mtime, split, column,
    ``max_documents``, SHA-256 of the SentencePiece model). ``block_size`` and ``add_bos`` are not part of the
    key: blocks are cut from the stream when read, so changing them re-uses the same tokens. The file is
    written to a temporary name, fsynced and renamed, so a crash never leaves a partial cache entry. A hub
    dataset is keyed by its name only: pin ``revision`` to notice upstream changes.

    Under ``torchrun``, only local rank 0 tokenizes; the other ranks wait for the cache file to appear (no
    collective is used, so a long tokenization cannot hit a process-group timeout).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch.utils.data import Dataset

from longlora_tune._io import atomic_open, atomic_write_json
from longlora_tune.data._load import REDPAJAMA_SAMPLE, DataFiles, describe_data_files
from longlora_tune.data.sources import diagnose_local_files, local_data_files, pretrain_fields, read_records
from longlora_tune.errors import LongLoRAConfigError

log = logging.getLogger(__name__)

# Bump when the stream layout changes, so stale cache entries are never read.
CACHE_FORMAT_VERSION = 1
_CHUNK_DOCS = 256
_WAIT_LOG_S = 60.0


def default_cache_dir() -> Path:
    """Default folder for tokenized streams: ``$XDG_CACHE_HOME/longlora_tune/pretrain`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longlora_tune" / "pretrain"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's SentencePiece model, or of its behaviour when it has none.

    Args:
        tokenizer: torchtune ``Llama2Tokenizer`` or ``SentencePieceBaseTokenizer`` (anything with ``encode``).

    Returns:
        Hex digest.
    """
    spm = getattr(getattr(tokenizer, "_spm_model", tokenizer), "spm_model", None)
    h = hashlib.sha256()
    if spm is not None and hasattr(spm, "serialized_model_proto"):
        h.update(spm.serialized_model_proto())
    else:
        # Tokenizers without a model file we can read: identify them by class, specials and a probe text.
        probe = "Hello world! 12345 \u00e9\u4e2d <s></s> [INST] def f(x):\n\treturn x"
        ids = tokenizer.encode(probe, add_bos=True, add_eos=True)
        h.update(repr((type(tokenizer).__qualname__, tokenizer.bos_id, tokenizer.eos_id, ids)).encode())
    return h.hexdigest()


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_docs(docs: list[str], tokenizer: Any = None, eos_id: Optional[int] = None) -> list[list[int]]:
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    # Empty or whitespace-only documents would only add a lone EOS.
    docs = [d for d in docs if d and not d.isspace()]
    if eos_id is None:
        return [tok.encode(d, add_bos=False, add_eos=True) for d in docs]
    return [tok.encode(d, add_bos=False, add_eos=False) + [eos_id] for d in docs]


def _doc_chunks(records: Any, column: str) -> Iterator[list[str]]:
    for batch in records.iter(batch_size=_CHUNK_DOCS):
        yield batch[column]


def _is_builder_rank() -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0


def _wait_for(path: Path) -> None:
    start = last = time.monotonic()
    while not path.exists():
        time.sleep(1.0)
        if time.monotonic() - last > _WAIT_LOG_S:
            last = time.monotonic()
            log.info("waiting for local rank 0 to tokenize into %s (%.0f s)", path, last - start)


class PackedBlocksDataset(Dataset):
    """Fixed-length blocks cut from a cached token stream (see the module docstring for the format).

    Map-style and deterministic: sharding and shuffling are the sampler's job. The stream is memory-mapped
    lazily in each process, so the dataset pickles cheaply into dataloader workers.

    Args:
        stream_path: raw token file written by :func:`packed_blocks_dataset`.
        dtype: numpy dtype of the file (``uint16`` or ``uint32``).
        block_size: tokens per block.
        bos_id: BOS id put at the start of each block when ``add_bos``.
        add_bos: start each block with BOS.

    Raises:
        LongLoRAConfigError: if the stream yields no full block.
    """

    def __init__(self, stream_path: Path, dtype: str, block_size: int, bos_id: int, add_bos: bool) -> None:
        self.stream_path = Path(stream_path)
        self.dtype = np.dtype(dtype)
        self.block_size = block_size
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.num_stream_tokens = self.stream_path.stat().st_size // self.dtype.itemsize
        self._stride = block_size - 1 if add_bos else block_size
        self._num_blocks = self.num_stream_tokens // self._stride
        self._stream: Optional[np.ndarray] = None
        if self._num_blocks == 0:
            raise LongLoRAConfigError(
                f"dataset yields 0 blocks of {block_size} tokens from {self.num_stream_tokens} tokens: "
                "add data or lower dataset.block_size"
            )

    def __len__(self) -> int:
        return self._num_blocks

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -self._num_blocks <= index < self._num_blocks:
            raise IndexError(f"block index {index} out of range for {self._num_blocks} blocks")
        index %= self._num_blocks
        if self._stream is None:
            self._stream = np.memmap(self.stream_path, dtype=self.dtype, mode="r")
        start = index * self._stride
        tokens = self._stream[start : start + self._stride].tolist()
        if self.add_bos:
            tokens.insert(0, self.bos_id)
        return {"tokens": tokens, "labels": list(tokens)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stream"] = None
        return state


def packed_blocks_dataset(
    tokenizer: Any,
    *,
    block_size: int,
    source: str = REDPAJAMA_SAMPLE,
    data_files: DataFiles = None,
    split: str = "train",
    column: str = "text",
    revision: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    num_proc: int = 1,
    max_documents: Optional[int] = None,
    add_bos: bool = True,
    eos_id: Optional[int] = None,
) -> PackedBlocksDataset:
    """Continued-pretraining dataset of fixed blocks of ``block_size`` tokens (the paper's RedPajama setup).

    Args:
        tokenizer: torchtune ``llama2_tokenizer(path, prompt_template=None)``.
        block_size: tokens per block (the training context length).
        source: hub repository id (default the RedPajama 1T sample, read from its ``*.jsonl`` files since
            ``datasets`` >= 4 cannot run its script), a packaged builder (``json``/``text``/``parquet``/
            ``csv``/``arrow``) with ``data_files``, or a local dataset folder.
        data_files: local or ``hf://`` path, list of paths/globs or ``{split: paths}``.
        split: split to read.
        column: text column.
        revision: hub revision, e.g. ``refs/convert/parquet`` for the hub's parquet conversion.
        cache_dir: folder of the tokenized cache; default :func:`default_cache_dir`.
        num_proc: tokenizer processes.
        max_documents: use only the first ``max_documents`` documents.
        add_bos: start every block with BOS (see the module docstring).
        eos_id: the token that ends every document; None: the tokenizer's ``eos_id``. The training recipe
            sets it to the base checkpoint's ``eos_token_id`` when the tokenizer's differs
            (:meth:`longlora_tune.hf.base.HFBaseModel.document_end_id`: Qwen2.5 base models end documents
            with ``<|endoftext|>``, torchtune's Qwen2.5 tokenizer with the chat token ``<|im_end|>``).

    Returns:
        A map-style dataset of ``{"tokens": list[int], "labels": list[int]}``, each ``block_size`` long.

    Raises:
        LongLoRAConfigError: (one line naming the file, line and fix) for invalid arguments, ``add_bos``
            with a tokenizer that has no BOS token, missing or unreadable files, a missing or non-text
            column, or data that yields no full block.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise LongLoRAConfigError(f"dataset.block_size={block_size!r} must be an integer >= 2")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise LongLoRAConfigError(f"dataset.num_proc={num_proc!r} must be an integer >= 1")
    if max_documents is not None and max_documents < 1:
        raise LongLoRAConfigError(f"dataset.max_documents={max_documents!r} must be >= 1 or null")
    if add_bos and getattr(tokenizer, "bos_id", None) is None:
        # Qwen2.5's tokenizer has no BOS token: blocks would start with None.
        raise LongLoRAConfigError(
            f"dataset.add_bos=true but {type(tokenizer).__name__} has no BOS token; set dataset.add_bos=false"
        )
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if eos_id is not None and (
        isinstance(eos_id, bool)
        or not isinstance(eos_id, int)
        or eos_id < 0
        or (vocab_size is not None and eos_id >= vocab_size)
    ):
        raise LongLoRAConfigError(
            f"dataset.eos_id={eos_id!r} must be a token id in [0, {vocab_size}) or null (the tokenizer's)"
        )
    if eos_id == getattr(tokenizer, "eos_id", None):
        eos_id = None  # the same stream as the default: one cache entry
    # Missing local files fail here, in one line, before the cache key stats them.
    local_data_files(source, data_files, split)

    key = {
        "format": CACHE_FORMAT_VERSION,
        "source": source,
        "revision": revision,
        "data_files": describe_data_files(source, data_files),
        "split": split,
        "column": column,
        "max_documents": max_documents,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    if eos_id is not None:
        key["eos_id"] = eos_id  # another document end is another stream (absent: earlier caches stay valid)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    dtype = "uint16" if vocab_size is not None and vocab_size <= 2**16 else "uint32"
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stream_path = folder / f"{digest}.{dtype}.bin"

    if not stream_path.exists():
        if _is_builder_rank():
            fields = pretrain_fields(column)
            records = read_records(
                source, data_files=data_files, split=split, revision=revision, fields=fields
            )
            if column not in records.column_names:
                raise LongLoRAConfigError(
                    f"dataset.column={column!r} is not in the dataset, whose columns are "
                    f"{records.column_names}; set dataset.column to the one holding the text"
                )
            dtype_name = getattr(records.features[column], "dtype", None)
            if dtype_name not in ("string", "large_string", "null"):
                diagnose_local_files(source, data_files, split, fields)  # names the file and line when local
                raise LongLoRAConfigError(
                    f"dataset.column={column!r} holds {records.features[column]}, not text; "
                    "set dataset.column to the column holding the documents' text"
                )
            if max_documents is not None:
                records = records.select(range(min(max_documents, len(records))))
            _tokenize_to_stream(tokenizer, records, column, stream_path, key, dtype, num_proc, eos_id)
        else:
            _wait_for(stream_path)
    else:
        log.info("using cached tokens %s", stream_path)
    return PackedBlocksDataset(stream_path, dtype, block_size, tokenizer.bos_id, add_bos)


def _tokenize_to_stream(
    tokenizer: Any,
    records: Any,
    column: str,
    stream_path: Path,
    key: dict[str, Any],
    dtype: str,
    num_proc: int,
    eos_id: Optional[int] = None,
) -> None:
    from tqdm import tqdm

    np_dtype = np.dtype(dtype)
    limit = np.iinfo(np_dtype).max
    n_docs = n_tokens = 0
    pool = None
    try:
        with atomic_open(stream_path, "wb") as f:
            chunks = _doc_chunks(records, column)
            if num_proc > 1:
                pool = multiprocessing.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,))
                encoded_chunks: Iterator[list[list[int]]] = pool.imap(
                    functools.partial(_encode_docs, eos_id=eos_id), chunks
                )
            else:
                encoded_chunks = (_encode_docs(c, tokenizer, eos_id) for c in chunks)
            with tqdm(total=len(records), desc="Tokenizing documents", unit="doc") as bar:
                for encoded in encoded_chunks:
                    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)
                    if flat.size and (flat.min() < 0 or flat.max() > limit):
                        raise ValueError(f"token id outside [0, {limit}] cannot be stored as {dtype}")
                    flat.astype(np_dtype).tofile(f)
                    n_tokens += flat.size
                    n_docs += len(encoded)
                    bar.update(min(_CHUNK_DOCS, bar.total - bar.n))
            meta = dict(key, dtype=dtype, num_documents=n_docs, num_tokens=n_tokens)
            # The sidecar is for people; the token file's rename (when this block ends) commits the entry.
            atomic_write_json(stream_path.with_suffix(".json"), meta, indent=1, sort_keys=True)
    finally:
        if pool is not None:
            pool.terminate()
    log.info("tokenized %d documents into %d tokens: %s", n_docs, n_tokens, stream_path)
