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
    The token stream (not the blocks) is stored as a raw ``uint16``/``uint32`` file ``<key>.<dtype>.bin`` in
    ``cache_dir``, beside a JSON sidecar ``<key>.<dtype>.json``. The key is a hash of what the stream
    depends on (:func:`stream_key`): the format version, the source and revision, the SHA-256 of every local
    data file's bytes in reading order (:func:`~longlora_tune.data._hashing.data_files_digest`; not their
    paths, sizes or times, so ``cp -p`` of an edited file is noticed and moved data is still found), split,
    column, ``max_documents``, the document end and the tokenizer's identity (class, SHA-256 of its model,
    vocabulary size). ``block_size`` and ``add_bos`` are not part of it: blocks are cut from the stream when
    read, so changing them re-uses the same tokens. A hub dataset is keyed by its name: pin ``revision`` to
    notice upstream changes.

    The sidecar records the key, ``dtype``, ``num_documents``, ``num_tokens`` and the SHA-256 of the
    ``.bin``. Before an entry is used, its size must be ``num_tokens`` whole tokens, its bytes must match
    the SHA-256 and every id must be below the tokenizer's vocabulary; an entry that fails (truncated,
    overwritten, odd-sized, ids out of range, sidecar missing or unreadable) is never used: it is
    re-tokenized with one warning naming the file and the problem. Both files are written under temporary
    names, fsynced and renamed (sidecar first), so a crash leaves either a whole entry or one that fails the
    check. Hashing costs about 0.7 s per GB (SHA-256, see :mod:`longlora_tune.data._hashing`) for the data
    files and again for the ``.bin``, each time the dataset is built.

    Under ``torchrun``, only local rank 0 tokenizes (and warns); the other ranks wait until the entry passes
    the same check (no collective is used, so a long tokenization cannot hit a process-group timeout).

Fingerprint
    :func:`dataset_fingerprint` (equal to :attr:`PackedBlocksDataset.fingerprint`) is a hash of the stream
    key plus ``block_size`` and ``add_bos``: it changes exactly when the blocks may, so a training
    checkpoint can record it and a resume can compare it.
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
from longlora_tune.data._hashing import data_files_digest, file_sha256
from longlora_tune.data._load import REDPAJAMA_SAMPLE, DataFiles
from longlora_tune.data.sources import (
    describe_files,
    diagnose_local_files,
    local_data_files,
    pretrain_fields,
    read_records,
)
from longlora_tune.errors import LongLoRAConfigError

log = logging.getLogger(__name__)

# Bump when the stream layout or the key changes, so stale cache entries are never read.
# 2: keyed on the data files' content; sidecar with the stream's sha256; tokenizer class and vocabulary.
CACHE_FORMAT_VERSION = 2
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


def tokenizer_vocab_size(tokenizer: Any) -> Optional[int]:
    """How many token ids the tokenizer has: every id it encodes to is below this.

    Args:
        tokenizer: a torchtune tokenizer.

    Returns:
        ``tokenizer.vocab_size``; for tokenizers without one (torchtune's Qwen2/Qwen2.5 byte-level BPE),
        one more than the largest id of its vocabulary and special tokens; None when neither is known.
    """
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int):
        return size
    ids = [
        i
        for table in (getattr(tokenizer, "encoder", None), getattr(tokenizer, "special_tokens", None))
        if isinstance(table, dict)
        for i in table.values()
    ]
    return max(ids) + 1 if ids else None


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer as the cache key and sidecar record it.

    Args:
        tokenizer: a torchtune tokenizer.

    Returns:
        ``{"class": ..., "sha256": tokenizer_fingerprint(...), "vocab_size": tokenizer_vocab_size(...)}``.
    """
    return {
        "class": type(tokenizer).__name__,
        "sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer_vocab_size(tokenizer),
    }


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_docs(docs: list[str], tokenizer: Any = None, eos_id: Optional[int] = None) -> list[list[int]]:
    """Each document's tokens, one list per document (empty for a document that is skipped)."""
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    # Empty or whitespace-only documents would only add a lone EOS. They keep their place (as []) so a bad
    # token can be reported with its record's index.
    out: list[list[int]] = []
    for d in docs:
        if not d or d.isspace():
            out.append([])
        elif eos_id is None:
            out.append(tok.encode(d, add_bos=False, add_eos=True))
        else:
            out.append(tok.encode(d, add_bos=False, add_eos=False) + [eos_id])
    return out


def _doc_chunks(records: Any, column: str) -> Iterator[list[str]]:
    for batch in records.iter(batch_size=_CHUNK_DOCS):
        yield batch[column]


def _is_builder_rank() -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------- the stream's inputs


def _check_packing(
    tokenizer: Any, block_size: Any, max_documents: Any, add_bos: bool, eos_id: Any
) -> Optional[int]:
    """Check the packing arguments; return ``eos_id``, None when it is the tokenizer's own (one stream)."""
    if not isinstance(block_size, int) or block_size < 2:
        raise LongLoRAConfigError(f"dataset.block_size={block_size!r} must be an integer >= 2")
    if max_documents is not None and max_documents < 1:
        raise LongLoRAConfigError(f"dataset.max_documents={max_documents!r} must be >= 1 or null")
    if add_bos and getattr(tokenizer, "bos_id", None) is None:
        # Qwen2.5's tokenizer has no BOS token: blocks would start with None.
        raise LongLoRAConfigError(
            f"dataset.add_bos=true but {type(tokenizer).__name__} has no BOS token; set dataset.add_bos=false"
        )
    vocab_size = tokenizer_vocab_size(tokenizer)
    if eos_id is not None and (
        isinstance(eos_id, bool)
        or not isinstance(eos_id, int)
        or eos_id < 0
        or (vocab_size is not None and eos_id >= vocab_size)
    ):
        raise LongLoRAConfigError(
            f"dataset.eos_id={eos_id!r} must be a token id in [0, {vocab_size}) or null (the tokenizer's)"
        )
    return None if eos_id == getattr(tokenizer, "eos_id", None) else eos_id


def stream_key(
    tokenizer: Any,
    *,
    source: str,
    data_files: DataFiles,
    split: str,
    column: str,
    revision: Optional[str],
    max_documents: Optional[int],
    eos_id: Optional[int],
    progress: bool = False,
) -> dict[str, Any]:
    """Everything the token stream depends on: the cache entry's name is its hash.

    Args:
        tokenizer: the tokenizer.
        source: ``dataset.source``; a local folder is recorded as ``"local folder"``, its files by content.
        data_files: ``dataset.data_files``.
        split: ``dataset.split``.
        column: ``dataset.column``.
        revision: hub revision.
        max_documents: ``dataset.max_documents``.
        eos_id: the document end, None for the tokenizer's (as :func:`_check_packing` returns it).
        progress: show progress bars while large data files are hashed.

    Returns:
        A JSON-serialisable dict without any local path.

    Raises:
        LongLoRAConfigError: an unknown source, missing files (one line naming them).
    """
    return {
        "format": CACHE_FORMAT_VERSION,
        "source": "local folder" if os.path.isdir(source) else source,
        "revision": revision,
        "data_files": data_files_digest(source, data_files, split, progress=progress),
        "split": split,
        "column": column,
        "max_documents": max_documents,
        "eos_id": eos_id,
        "tokenizer": tokenizer_identity(tokenizer),
    }


def _blocks_fingerprint(key: dict[str, Any], block_size: int, add_bos: bool) -> str:
    return _digest({"stream": key, "block_size": block_size, "add_bos": add_bos})


def dataset_fingerprint(
    tokenizer: Any,
    *,
    block_size: int,
    source: str = REDPAJAMA_SAMPLE,
    data_files: DataFiles = None,
    split: str = "train",
    column: str = "text",
    revision: Optional[str] = None,
    max_documents: Optional[int] = None,
    add_bos: bool = True,
    eos_id: Optional[int] = None,
) -> str:
    """A stable fingerprint of the blocks :func:`packed_blocks_dataset` builds from these arguments.

    It hashes the content of the local data files (SHA-256 of their bytes, in reading order: not their paths,
    so moved data keeps its fingerprint, and an edit keeping size and modification time changes it), the
    tokenizer's identity (class, model SHA-256, vocabulary size), the source, revision, split, column,
    ``max_documents``, document end, ``block_size``, ``add_bos`` and the cache format version. A hub dataset
    contributes its name and ``revision`` only. Equal to the built dataset's
    :attr:`PackedBlocksDataset.fingerprint`, for a training checkpoint to record and a resume to compare
    without building the dataset; it reads every data file, like the builder.

    Args:
        tokenizer: the tokenizer passed to :func:`packed_blocks_dataset`.
        block_size: tokens per block.
        source: as :func:`packed_blocks_dataset`.
        data_files: as :func:`packed_blocks_dataset`.
        split: as :func:`packed_blocks_dataset`.
        column: as :func:`packed_blocks_dataset`.
        revision: as :func:`packed_blocks_dataset`.
        max_documents: as :func:`packed_blocks_dataset`.
        add_bos: as :func:`packed_blocks_dataset`.
        eos_id: as :func:`packed_blocks_dataset` (the tokenizer's own EOS and None give the same value).

    Returns:
        64 hex digits.

    Raises:
        LongLoRAConfigError: the arguments :func:`packed_blocks_dataset` refuses before reading records
            (bad ``block_size``/``max_documents``/``eos_id``/``add_bos``, unknown source, missing files).
    """
    eos_id = _check_packing(tokenizer, block_size, max_documents, add_bos, eos_id)
    key = stream_key(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        column=column,
        revision=revision,
        max_documents=max_documents,
        eos_id=eos_id,
    )
    return _blocks_fingerprint(key, block_size, add_bos)


# ------------------------------------------------------------------------------------ the cache entry


def _sidecar(stream_path: Path) -> Path:
    return stream_path.with_suffix(".json")


def _size_problem(size: int, dtype: np.dtype) -> Optional[str]:
    if size % dtype.itemsize:
        return f"is {size} bytes, not a whole number of {dtype.itemsize}-byte {dtype.name} tokens"
    return None


def _entry_problem(
    stream_path: Path, key: dict[str, Any], dtype: np.dtype, vocab_size: Optional[int], progress: bool
) -> Optional[str]:
    """Why the cache entry cannot be used (text to follow its path), or None when it is whole."""
    sidecar = _sidecar(stream_path)
    if not sidecar.exists():
        return f"has no sidecar {sidecar}"
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        return f"its sidecar {sidecar} is not a JSON object"
    for name, value in key.items():
        if meta.get(name) != value:
            return f"its sidecar {sidecar} records another {name}"
    num_tokens, checksum = meta.get("num_tokens"), meta.get("sha256")
    if meta.get("dtype") != dtype.name or not isinstance(num_tokens, int) or not isinstance(checksum, str):
        return f"its sidecar {sidecar} lacks dtype {dtype.name}, num_tokens or sha256"
    size = stream_path.stat().st_size
    problem = _size_problem(size, dtype)
    if problem is not None:
        return problem
    if size // dtype.itemsize != num_tokens:
        return f"holds {size // dtype.itemsize} tokens, but its sidecar records {num_tokens}"
    largest = -1

    def track_largest(chunk: bytes) -> None:
        nonlocal largest
        if chunk:
            largest = max(largest, int(np.frombuffer(chunk, dtype=dtype).max()))

    digest = file_sha256(stream_path, progress=progress, visit=track_largest)
    if vocab_size is not None and largest >= vocab_size:
        # Checked from the bytes themselves: such an id would be an IndexError in the embedding mid-training.
        return f"holds token id {largest}, beyond the tokenizer's {vocab_size}-token vocabulary"
    if digest != checksum:
        return "does not match the sha256 its sidecar records (changed after it was written)"
    return None


def _entry_state(stream_path: Path) -> Optional[tuple[Any, ...]]:
    """What identifies the entry's current files (a rename by rank 0 changes it), or None without a stream."""
    try:
        st = stream_path.stat()
    except FileNotFoundError:
        return None
    try:
        side = _sidecar(stream_path).stat()
        side_state: Optional[tuple[int, int, int]] = (side.st_ino, side.st_size, side.st_mtime_ns)
    except FileNotFoundError:
        side_state = None
    return st.st_ino, st.st_size, st.st_mtime_ns, side_state


def _wait_for_entry(stream_path: Path, problem: Any) -> None:
    """Wait (another rank than local rank 0) until the entry exists and ``problem()`` finds it whole."""
    start = last = time.monotonic()
    checked = None
    while True:
        state = _entry_state(stream_path)
        # A big stream is hashed again only when rank 0 has replaced a file, not every second.
        if state is not None and state != checked:
            checked = state
            if problem() is None:
                return
        time.sleep(1.0)
        if time.monotonic() - last > _WAIT_LOG_S:
            last = time.monotonic()
            log.info("waiting for local rank 0 to tokenize into %s (%.0f s)", stream_path, last - start)


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
        fingerprint: :func:`dataset_fingerprint` of the arguments the stream was built from, if known.

    Attributes:
        fingerprint: as given (:func:`packed_blocks_dataset` sets it).
        num_stream_tokens: tokens in the stream.

    Raises:
        LongLoRAConfigError: if the file is not a whole number of tokens, or the stream yields no full block.
    """

    def __init__(
        self,
        stream_path: Path,
        dtype: str,
        block_size: int,
        bos_id: int,
        add_bos: bool,
        fingerprint: Optional[str] = None,
    ) -> None:
        self.stream_path = Path(stream_path)
        self.dtype = np.dtype(dtype)
        self.block_size = block_size
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.fingerprint = fingerprint
        size = self.stream_path.stat().st_size
        problem = _size_problem(size, self.dtype)
        if problem is not None:
            raise LongLoRAConfigError(f"token stream {self.stream_path} {problem}; delete it and re-tokenize")
        self.num_stream_tokens = size // self.dtype.itemsize
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
        source: hub repository id ``owner/name`` (default the RedPajama 1T sample, read from its ``*.jsonl``
            files since ``datasets`` >= 4 cannot run its script), a packaged builder
            (``json``/``text``/``parquet``/``csv``/``arrow``) with ``data_files``, or a local dataset folder.
        data_files: local or ``hf://`` path, list of paths/globs or ``{split: paths}``.
        split: split to read.
        column: text column (of a CSV file, read as text whatever it holds; empty cells are no documents).
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
        A map-style dataset of ``{"tokens": list[int], "labels": list[int]}``, each ``block_size`` long, with
        ``fingerprint`` set to :func:`dataset_fingerprint` of these arguments.

    Raises:
        LongLoRAConfigError: (one line naming the file, line and fix) for invalid arguments, an unknown
            source, ``add_bos`` with a tokenizer that has no BOS token, missing or unreadable files, a
            missing or non-text column, a token id beyond the tokenizer's vocabulary, or data that yields no
            full block.
    """
    if not isinstance(num_proc, int) or num_proc < 1:
        raise LongLoRAConfigError(f"dataset.num_proc={num_proc!r} must be an integer >= 1")
    eos_id = _check_packing(tokenizer, block_size, max_documents, add_bos, eos_id)
    builder = _is_builder_rank()
    key = stream_key(
        tokenizer,
        source=source,
        data_files=data_files,
        split=split,
        column=column,
        revision=revision,
        max_documents=max_documents,
        eos_id=eos_id,
        progress=builder,
    )
    vocab_size = key["tokenizer"]["vocab_size"]
    dtype = np.dtype("uint16" if vocab_size is not None and vocab_size <= 2**16 else "uint32")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stream_path = folder / f"{_digest(key)[:32]}.{dtype.name}.bin"

    def problem() -> Optional[str]:
        return _entry_problem(stream_path, key, dtype, vocab_size, progress=builder)

    if not builder:
        _wait_for_entry(stream_path, problem)
    else:
        damage = problem() if stream_path.exists() else None
        if stream_path.exists() and damage is None:
            log.info("using cached tokens %s", stream_path)
        else:
            if damage is not None:
                log.warning("cached tokens %s %s; re-tokenizing", stream_path, damage)
            records = _read_documents(source, data_files, split, revision, column, max_documents)
            inputs = _inputs_named(source, data_files, split)
            _tokenize_to_stream(tokenizer, records, column, stream_path, key, dtype, num_proc, eos_id, inputs)
    return PackedBlocksDataset(
        stream_path,
        dtype.name,
        block_size,
        tokenizer.bos_id,
        add_bos,
        _blocks_fingerprint(key, block_size, add_bos),
    )


def _read_documents(
    source: str,
    data_files: DataFiles,
    split: str,
    revision: Optional[str],
    column: str,
    max_documents: Optional[int],
) -> Any:
    """The records to tokenize, their text ``column`` checked, cut to ``max_documents``."""
    fields = pretrain_fields(column)
    # Read only when the content-keyed entry is missing or damaged: datasets' own cache must not answer.
    records = read_records(
        source, data_files=data_files, split=split, revision=revision, fields=fields, fresh=True
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
    return records


def _inputs_named(source: str, data_files: DataFiles, split: str) -> str:
    """The split's inputs as an error message names them: its local files, or the source."""
    found = local_data_files(source, data_files, split)
    return describe_files(found[1]) if found is not None else f"dataset.source={source}"


def _tokenize_to_stream(
    tokenizer: Any,
    records: Any,
    column: str,
    stream_path: Path,
    key: dict[str, Any],
    dtype: np.dtype,
    num_proc: int,
    eos_id: Optional[int],
    inputs: str,
) -> None:
    from tqdm import tqdm

    vocab_size = key["tokenizer"]["vocab_size"]
    # Without a known vocabulary, the ids must at least fit the file's dtype.
    limit = vocab_size if vocab_size is not None else int(np.iinfo(dtype).max) + 1
    h = hashlib.sha256()
    n_docs = n_tokens = n_records = 0
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
                    if flat.size and (flat.min() < 0 or flat.max() >= limit):
                        raise _bad_id_error(tokenizer, encoded, limit, inputs, n_records)
                    data = flat.astype(dtype).tobytes()
                    h.update(data)
                    f.write(data)
                    n_tokens += flat.size
                    n_docs += sum(1 for ids in encoded if ids)
                    n_records += len(encoded)
                    bar.update(len(encoded))
            meta = dict(
                key, dtype=dtype.name, num_documents=n_docs, num_tokens=n_tokens, sha256=h.hexdigest()
            )
            # Written before the token file's rename (when this block ends): a crash in between leaves a
            # sidecar that the old or missing stream fails, never a stream with a stale sidecar that passes.
            atomic_write_json(_sidecar(stream_path), meta, indent=1, sort_keys=True)
    finally:
        if pool is not None:
            pool.terminate()
    log.info("tokenized %d documents into %d tokens: %s", n_docs, n_tokens, stream_path)


def _bad_id_error(
    tokenizer: Any, encoded: list[list[int]], limit: int, inputs: str, first_record: int
) -> LongLoRAConfigError:
    """The one-line error for the first record whose tokens fall outside ``[0, limit)``."""
    index, bad = next((i, t) for i, ids in enumerate(encoded) for t in ids if not 0 <= t < limit)
    return LongLoRAConfigError(
        f"{inputs}: record {first_record + index} encodes to token id {bad}, outside [0, {limit}) of "
        f"{type(tokenizer).__name__}'s vocabulary; set tokenizer.path to the model's own tokenizer"
    )
