"""Checks of a dataset's local files that fail in one line, before (or instead of) a ``datasets`` traceback.

:func:`check_dataset_source` takes the config's ``dataset`` section and checks, without a tokenizer or a
model, that its local files exist, that their start is readable in the format the builder will use, and
that they hold at least one record with the fields the builder needs. The recipe calls it before building
anything heavy, so a typo in a path costs a second instead of a 7B model load.

It reads only the first ``sample_bytes`` of each file (and at least one whole record), because a
pretraining corpus can be many gigabytes and its tokens are usually cached: the builders then read
everything, and when ``datasets`` fails they run the same checks over the whole files
(:func:`diagnose_local_files`), so a bad line deep in a file is reported with its file and line number too.

Hub datasets (``source`` not a packaged builder or local folder) cannot be checked offline and are skipped.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from longlora_tune.data._load import LONGALPACA_12K, PACKAGED_BUILDERS, REDPAJAMA_SAMPLE, DataFiles
from longlora_tune.errors import LongLoRAConfigError

#: Default bytes read from the start of each file by :func:`check_dataset_source`.
SAMPLE_BYTES = 1 << 20

# File extension -> packaged builder, for the "set source=<builder>" hint and local dataset folders.
_EXTENSION_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
_UTF8_BOM = b"\xef\xbb\xbf"
_FORMAT_HINTS = {
    "json": "one JSON object per line, or one JSON list of objects",
    "text": "one document per line",
    "parquet": "a Parquet table",
    "csv": "a header line and one record per line",
    "arrow": "an Arrow stream or file",
}


@dataclass(frozen=True)
class RecordFields:
    """The fields a builder reads from each record.

    Attributes:
        required: fields that must be a string in every record.
        optional: fields that may be missing or null, and are strings otherwise.
        somewhere: fields that at least one record must have (for a column the builder reads by name).
        nonempty: required fields whose text must not be empty or only whitespace.
        hint: the fix, appended to every field error (what the builder expects).
    """

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    somewhere: tuple[str, ...] = ()
    nonempty: tuple[str, ...] = ()
    hint: str = "fix or remove that record"


# An empty answer is refused, not skipped: its only target is the end-of-sequence token, so the record
# teaches "answer nothing", and a dataset with many of them is almost always a column mix-up that a
# one-line count in the log would hide.
LONGALPACA_FIELDS = RecordFields(
    required=("instruction", "output"),
    optional=("input",),
    nonempty=("output",),
    hint="every LongAlpaca record needs string 'instruction' and non-empty 'output' fields ('input' is "
    "optional): write its answer or remove the record",
)


def pretrain_fields(column: str) -> RecordFields:
    """The fields :func:`longlora_tune.data.packed_blocks_dataset` reads: the text ``column``.

    Args:
        column: the text column (``dataset.column``).

    Returns:
        A :class:`RecordFields`: ``column`` is a string or null (null documents are skipped) and present in
        at least one record.
    """
    return RecordFields(
        optional=(column,),
        somewhere=(column,),
        hint=f"dataset.column={column!r} must name the records' text field, a string",
    )


class RecordFieldError(LongLoRAConfigError):
    """A record (found by its index, not its file) lacks a field the builder needs, or has the wrong type.

    Attributes:
        index: the record's 0-based index in the loaded split.
    """

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def _kind(value: Any) -> str:
    # JSON's names: the files are JSON (or tables read into Python values), not Python objects.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_problem(record: Mapping[str, Any], fields: RecordFields) -> Optional[str]:
    """What is wrong with one record's fields, or None.

    Args:
        record: the record (a JSON object, or a table row as a dict).
        fields: what the builder needs.

    Returns:
        ``"field 'output' is null"``-style text without location or fix, or None when the record is fine.
    """
    for name in fields.required:
        if name not in record:
            return f"record has no {name!r} field (it has {sorted(record)})"
        if not isinstance(record[name], str):
            value = record[name]
            shown = "" if value is None else f" ({_short(value)})"
            return f"field {name!r} is {_kind(value)}{shown}, not a string"
    for name in fields.nonempty:
        if not record[name].strip():
            return f"field {name!r} is empty ({_short(record[name])}): nothing to train on"
    for name in fields.optional:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return f"field {name!r} is {_kind(value)} ({_short(value)}), not a string"
    return None


# ----------------------------------------------------------------------------------------- resolving files


def plain_config(value: Any) -> Any:
    """OmegaConf containers as plain lists/dicts (configs pass ``ListConfig`` data_files).

    Args:
        value: anything; a ``DictConfig``/``ListConfig`` is converted (interpolations resolved).

    Returns:
        ``value`` itself, or its plain-container copy.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with torchtune
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).suffix.lower() in _EXTENSION_BUILDERS


def _unknown_source(source: str) -> LongLoRAConfigError:
    # "jsonl" or "JSON" is a file extension or a misspelt builder: name the builder meant.
    guess = _EXTENSION_BUILDERS.get("." + source.lower().lstrip("."))
    hint = f" (did you mean {guess}?)" if guess else ""
    builders = f"{', '.join(PACKAGED_BUILDERS[:-1])} or {PACKAGED_BUILDERS[-1]}"
    return LongLoRAConfigError(
        f"dataset.source={source} is not a dataset source{hint}; use {builders} with dataset.data_files, "
        "a local dataset folder, or a hub id owner/name"
    )


def _expand_pattern(pattern: str, base: Optional[Path]) -> list[Path]:
    where = Path(pattern) if base is None or os.path.isabs(pattern) else base / pattern
    if glob.has_magic(str(where)):
        matches = sorted(Path(p) for p in glob.glob(str(where), recursive=True) if os.path.isfile(p))
        if not matches:
            raise LongLoRAConfigError(
                f"dataset.data_files: {where} matches no file; check the pattern "
                f"(relative paths are read from {os.getcwd()})"
            )
        return matches
    if where.is_dir():
        raise LongLoRAConfigError(
            f"dataset.data_files: {where} is a folder; name the files in it, e.g. {where / '*.jsonl'}"
        )
    if not where.is_file():
        hint = (
            "a leading ~ is not expanded: write the full path"
            if pattern.startswith("~")
            else f"relative paths are read from {os.getcwd()}"
        )
        raise LongLoRAConfigError(
            f"dataset.data_files: {where} does not exist; give an existing file ({hint})"
        )
    return [where]


@dataclass(frozen=True)
class SplitInputs:
    """The local files (and remote paths) one split of a dataset is read from.

    Attributes:
        fmt: the packaged builder that reads them, or None when ``datasets`` picks it (a folder without
            ``data_files``) or the files' extension names no builder.
        entries: one per ``data_files`` entry, in order: the local files it names (a glob's matches,
            sorted), or a remote path (``hf://``, ``https://``) as written.
        folder: the local dataset folder the entries are relative to, or None.
        picked_by_datasets: a folder without ``data_files``: ``entries`` is its one list of visible files,
            from which ``datasets`` picks the split's files by their names.
    """

    fmt: Optional[str]
    entries: list[Union[str, list[Path]]]
    folder: Optional[Path] = None
    picked_by_datasets: bool = False

    @property
    def local_files(self) -> list[Path]:
        """Every local file of the split, in order."""
        return [path for entry in self.entries if not isinstance(entry, str) for path in entry]


def _visible_files(folder: Path) -> list[Path]:
    # datasets skips hidden files and folders (.git, .cache, ...) when it looks for data files.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def split_inputs(source: str, data_files: DataFiles, split: str = "train") -> Optional[SplitInputs]:
    """Resolve a dataset's ``source`` and ``data_files`` to what one split is read from.

    Args:
        source: ``dataset.source``: a packaged builder (``json``, ``text``, ...), a local folder or a hub id.
        data_files: ``dataset.data_files``: a path, a glob, a list of them, or ``{split: paths}``.
        split: ``dataset.split``.

    Returns:
        A :class:`SplitInputs`, or None for a hub id (nothing local to resolve).

    Raises:
        LongLoRAConfigError: a ``source`` that is none of a packaged builder, a local folder or a hub id
            ``owner/name`` (naming the accepted ones), a missing file, a glob matching nothing, a folder where
            files are needed, an empty folder, a packaged builder without ``data_files``, a missing split, or
            a file given as ``source``.
    """
    data_files = plain_config(data_files)
    folder: Optional[Path] = None
    if source in PACKAGED_BUILDERS:
        fmt: Optional[str] = source
        if data_files is None:
            raise LongLoRAConfigError(
                f"dataset.source={source} needs dataset.data_files (a path, a list of paths or a glob)"
            )
    elif os.path.isdir(source):
        fmt, folder = None, Path(source)
        if data_files is None:
            files = _visible_files(folder)
            if not files:
                raise LongLoRAConfigError(
                    f"dataset.source={source} is an empty folder; put the data files in it"
                )
            return SplitInputs(None, [files], folder, picked_by_datasets=True)
    elif os.path.isfile(source):
        builder = _EXTENSION_BUILDERS.get(Path(source).suffix.lower(), "json")
        raise LongLoRAConfigError(
            f"dataset.source={source} is a file, but source names the format; set "
            f"dataset.source={builder} dataset.data_files={source}"
        )
    elif _looks_like_path(source):
        raise LongLoRAConfigError(
            f"dataset.source={source} does not exist; give a hub id, a local folder, or "
            "dataset.source=json (text, parquet, ...) with dataset.data_files=<path>"
        )
    elif "/" not in source:
        # Hub ids are owner/name; a bare word is a builder name datasets does not have ("jsonl", "tsv").
        raise _unknown_source(source)
    else:
        return None  # a hub id
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise LongLoRAConfigError(
                f"dataset.data_files has no {split!r} split (it has {sorted(data_files)}); "
                "set dataset.split to one of them"
            )
        data_files = data_files[split]
    patterns = [str(p) for p in data_files] if isinstance(data_files, (list, tuple)) else [str(data_files)]
    if not patterns:
        raise LongLoRAConfigError("dataset.data_files is an empty list; name at least one file")
    entries: list[Union[str, list[Path]]] = [
        pattern if "://" in pattern else _expand_pattern(pattern, folder) for pattern in patterns
    ]
    inputs = SplitInputs(fmt, entries, folder)
    if fmt is None and inputs.local_files:
        inputs = SplitInputs(_EXTENSION_BUILDERS.get(inputs.local_files[0].suffix.lower()), entries, folder)
    return inputs


def local_data_files(
    source: str, data_files: DataFiles, split: str = "train"
) -> Optional[tuple[str, list[Path]]]:
    """The local files a builder will read, and their format; None when there is nothing local to check.

    Args:
        source: ``dataset.source``: a packaged builder (``json``, ``text``, ...), a local folder or a hub id.
        data_files: ``dataset.data_files``: a path, a glob, a list of them, or ``{split: paths}``.
        split: ``dataset.split``.

    Returns:
        ``(format, files)``, or None for a hub id, remote paths only, a folder whose files ``datasets``
        picks, or files whose extension names no builder. Remote (``hf://``, ``https://``) entries of a list
        are left out.

    Raises:
        LongLoRAConfigError: as :func:`split_inputs`.
    """
    inputs = split_inputs(source, data_files, split)
    if inputs is None or inputs.picked_by_datasets or inputs.fmt is None or not inputs.local_files:
        return None
    return inputs.fmt, inputs.local_files


def describe_files(files: list[Path]) -> str:
    """Name a list of files in a message: the first, and how many more.

    Args:
        files: at least one file.

    Returns:
        ``"/data/a.jsonl"`` or ``"/data/a.jsonl (and 3 more files)"``.
    """
    return str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"


# ---------------------------------------------------------------------------------------- reading records


def _head(path: Path, max_bytes: Optional[int]) -> tuple[bytes, bool]:
    """The file's first ``max_bytes`` bytes extended to a line end, and whether that is the whole file."""
    with open(path, "rb") as f:
        if max_bytes is None:
            return f.read(), True
        data = f.read(max_bytes)
        if len(data) < max_bytes:
            return data, True
        data += f.readline()  # finish the line: no record or UTF-8 character is cut in two
        return data, not f.read(1)


def _decode(path: Path, data: bytes) -> str:
    offset = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = offset + e.start
        line = data.count(b"\n", 0, at) + 1
        raise LongLoRAConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); save the file as UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None


class _Lines:
    """Line numbers of text offsets, counted incrementally (offsets are asked in increasing order)."""

    def __init__(self, text: str) -> None:
        self._text, self._pos, self._line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self._pos:
            self._pos, self._line = 0, 1
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


_JSON_SHAPE = "the file must hold JSON objects (one per line), or be one JSON list of objects"


class _Truncated(Exception):
    """A JSON error at the end of a sampled file start: the cut may have gone through a multi-line value."""


def _cut_here(text: str, pos: int, complete: bool, message: str) -> bool:
    # The sample ends at a line end, so a value cut in two fails at the sample's end, except for a string
    # (raw newlines are allowed in strings here), which fails where it starts. Errors elsewhere are real.
    return not complete and (pos >= len(text.rstrip()) or message.startswith("Unterminated string"))


def _json_error(
    path: Path, text: str, e: json.JSONDecodeError, complete: bool, start_line: Optional[int] = None
) -> LongLoRAConfigError:
    if _cut_here(text, e.pos, complete, e.msg):
        raise _Truncated
    if start_line is not None and start_line != e.lineno:
        # A record broken on its own line (an unclosed string) fails only on a later one: name its start.
        return LongLoRAConfigError(
            f"{path}:{start_line}: invalid JSON in the record starting on this line ({e.msg} at line "
            f"{e.lineno}, column {e.colno}); {_JSON_SHAPE}"
        )
    return LongLoRAConfigError(
        f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); {_JSON_SHAPE}"
    )


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_objects(path: Path, text: str, complete: bool) -> Iterator[tuple[str, Any]]:
    """JSON objects separated by white space: what pyarrow's reader (behind ``datasets``) accepts.

    That is JSON Lines, but also pretty-printed objects one after another.
    """
    decoder = json.JSONDecoder(strict=False)
    lines = _Lines(text)
    pos = _skip_space(text, 0)
    while pos < len(text):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, text, e, complete, lines.at(pos)) from None
        where = f"{path}:{lines.at(pos)}"
        if not isinstance(value, dict):
            raise LongLoRAConfigError(
                f"{where}: {_kind(value)}, not a JSON object; each record must be one JSON object, "
                'e.g. {"text": "..."}'
            )
        yield where, value
        pos = _skip_space(text, end)


def _json_list(path: Path, text: str, complete: bool, max_chars: Optional[int]) -> Iterator[tuple[str, Any]]:
    """Items of a JSON list, parsed one by one so that a large file is only read as far as needed."""
    decoder = json.JSONDecoder(strict=False)
    lines = _Lines(text)

    def bad(pos: int, what: str) -> LongLoRAConfigError:
        if _cut_here(text, pos, complete, what):
            raise _Truncated
        return LongLoRAConfigError(f"{path}:{lines.at(pos)}: {what}; {_JSON_SHAPE}")

    pos = _skip_space(text, 1)
    if pos < len(text) and text[pos] == "]":
        pos = _skip_space(text, pos + 1)
        if pos < len(text):
            raise bad(pos, "extra data after the list")
        return
    item_type: Optional[type] = None
    index = 0
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, text, e, complete) from None
        where = f"{path}:{lines.at(pos)} (list item {index})"
        # datasets reads a list of strings as {"text": item} records, and any other list as objects.
        if item_type is None:
            item_type = str if isinstance(value, str) else dict
        if not isinstance(value, item_type):
            wanted = "a string" if item_type is str else "an object"
            raise LongLoRAConfigError(
                f"{where}: {_kind(value)}, not {wanted}; the file must be one JSON list "
                "of objects (or of strings)"
            )
        yield where, ({"text": value} if item_type is str else value)
        index += 1
        if not complete and max_chars is not None and end >= max_chars:
            return
        pos = _skip_space(text, end)
        if pos >= len(text):
            raise bad(pos, "the list is not closed with ']'")
        if text[pos] == "]":
            pos = _skip_space(text, pos + 1)
            if pos < len(text):
                raise bad(pos, "extra data after the list")
            return
        if text[pos] != ",":
            raise bad(pos, "expected ',' or ']' after a list item")
        pos = _skip_space(text, pos + 1)


def _json_records(path: Path, max_bytes: Optional[int]) -> Iterator[tuple[str, Any]]:
    """Records of a JSON file (or of its first ``max_bytes``), as the ``datasets`` json builder reads them."""
    data, complete = _head(path, max_bytes)
    text = _decode(path, data)
    # datasets' own test: the file is a list when its first byte (after a BOM) is '['.
    if text.startswith("["):
        records = _json_list(path, text, complete, max_bytes)
    else:
        records = _json_objects(path, text, complete)
    if complete:
        return records
    try:
        return iter(list(records))
    except _Truncated:
        # Read twice as much: past the cut value, or up to the whole file, where every error is real.
        return _json_records(path, 2 * max_bytes if max_bytes is not None else None)


def _table_rows(path: Path, fmt: str, max_rows: Optional[int]) -> tuple[list[str], Iterator[dict]]:
    """Column names and rows of a Parquet or Arrow file."""
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table_file = pq.ParquetFile(str(path))
            names = table_file.schema_arrow.names
            batches: Iterator[Any] = table_file.iter_batches(batch_size=max_rows or 1024)
        else:
            source = pa.memory_map(str(path))
            try:
                reader: Any = pa.ipc.open_stream(source)
                batches = iter(reader)
            except (OSError, pa.ArrowInvalid):
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            names = reader.schema.names
    except (OSError, pa.ArrowException) as e:
        raise LongLoRAConfigError(
            f"{path}: not a readable {fmt} file ({str(e).splitlines()[0]}); check the file and dataset.source"
        ) from None

    def rows() -> Iterator[dict]:
        seen = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield row
                seen += 1
                if max_rows is not None and seen >= max_rows:
                    return

    return names, rows()


def _records(
    path: Path, fmt: str, max_bytes: Optional[int]
) -> tuple[Iterator[tuple[str, Any]], Optional[list]]:
    """``(location, record)`` pairs from the file's start (or all of it) and, for tables, the column names."""
    if fmt in ("parquet", "arrow"):
        names, rows = _table_rows(path, fmt, None if max_bytes is None else 1024)
        return ((f"{path} row {i}", row) for i, row in enumerate(rows, start=1)), names
    if fmt == "json":
        return _json_records(path, max_bytes), None
    data, complete = _head(path, max_bytes)
    text = _decode(path, data)
    if fmt == "text":
        lines = text.splitlines()
        return ((f"{path}:{i}", {"text": line}) for i, line in enumerate(lines, start=1)), None
    if fmt == "csv":
        return _csv_records(path, text, complete)
    raise ValueError(f"unknown format {fmt!r}")


def _csv_records(path: Path, text: str, complete: bool) -> tuple[Iterator[tuple[str, Any]], list[str]]:
    """Records of a CSV file's text as ``read_records`` loads them, each located by the line it starts on.

    Cells are strings (``read_records`` reads the text columns as strings) and an empty or missing cell is
    null (pandas' NA). A row with more cells than the header is an error: pandas fails on it, or, on the
    first row, silently makes the first column an index.
    """
    # newline="": a quoted field may hold line breaks; line_num then counts every line a row spans.
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])

    def rows() -> Iterator[tuple[int, list[str]]]:
        start = reader.line_num + 1
        try:
            for row in reader:
                yield start, row
                start = reader.line_num + 1
        except csv.Error as e:
            if complete:  # otherwise the sample's cut fell inside a quoted field
                raise LongLoRAConfigError(
                    f"{path}:{start}: invalid CSV ({e}); {_FORMAT_HINTS['csv']}"
                ) from None

    def record(start: int, row: list[str]) -> tuple[str, dict[str, Optional[str]]]:
        if len(row) > len(header):
            raise LongLoRAConfigError(
                f"{path}:{start}: {len(row)} fields, but the header has {len(header)}; quote fields that "
                'hold the delimiter ("a, b")'
            )
        return f"{path}:{start}", {
            name: (row[i] if i < len(row) and row[i] else None) for i, name in enumerate(header)
        }

    def records() -> Iterator[tuple[str, Any]]:
        last: Optional[tuple[int, list[str]]] = None
        read = 0
        for start, row in rows():
            if not row:
                continue  # pandas skips blank lines
            if last is not None:
                yield record(*last)
                read += 1
            last = start, row
        # A sample's last row may be cut short; keep it when it is the only one.
        if last is not None and (complete or read == 0):
            yield record(*last)

    return records(), header


def _check_file(path: Path, fmt: str, fields: Optional[RecordFields], max_bytes: Optional[int]) -> int:
    """Check one file's (sampled) records; return how many were read."""
    if path.stat().st_size == 0:
        return 0
    records, names = _records(path, fmt, max_bytes)
    if names is not None and fields is not None:
        missing = [n for n in fields.required + fields.somewhere if n not in names]
        if missing:
            raise LongLoRAConfigError(f"{path}: no column {missing[0]!r} (columns: {names}); {fields.hint}")
    count = 0
    seen: set[str] = set()
    first: list[str] = []
    for where, record in records:
        count += 1
        if count == 1:
            first = sorted(record)
        if fields is not None:
            problem = field_problem(record, fields)
            if problem is not None:
                raise LongLoRAConfigError(f"{where}: {problem}; {fields.hint}")
            seen.update(n for n in fields.somewhere if n in record)
    if fields is not None and count:
        absent = [n for n in fields.somewhere if n not in seen]
        if absent:
            raise LongLoRAConfigError(
                f"{path}: no record has a {absent[0]!r} field (the first has {first}); {fields.hint}"
            )
    return count


def _check_files(
    fmt: str, files: list[Path], fields: Optional[RecordFields], max_bytes: Optional[int]
) -> None:
    total = sum(_check_file(path, fmt, fields, max_bytes) for path in files)
    if total == 0:
        raise LongLoRAConfigError(
            f"{describe_files(files)} holds no records; add at least one "
            f"({_FORMAT_HINTS.get(fmt, 'records')}) or point dataset.data_files at the data"
        )


def builder_fields(dataset_cfg: Mapping[str, Any]) -> tuple[Optional[str], Optional[RecordFields]]:
    """The default ``source`` and the record fields of the builder a ``dataset`` config names.

    Args:
        dataset_cfg: the config's ``dataset`` section (``_component_`` names the builder).

    Returns:
        ``(default_source, fields)``; ``(None, None)`` for a builder this module does not know.
    """
    name = str(dataset_cfg.get("_component_", "")).rsplit(".", 1)[-1]
    if name == "packed_blocks_dataset":
        return REDPAJAMA_SAMPLE, pretrain_fields(str(dataset_cfg.get("column", "text")))
    if name == "longalpaca_dataset":
        return LONGALPACA_12K, LONGALPACA_FIELDS
    return None, None


def check_dataset_source(dataset_cfg: Mapping[str, Any], *, sample_bytes: int = SAMPLE_BYTES) -> None:
    """Check a ``dataset`` config's local files before any model, tokenizer or dataset is built.

    Checks that ``source`` is a packaged builder, a local folder or a hub id ``owner/name``, that every local
    data file exists (``data_files`` may be a path, a glob, a list of them or ``{split: paths}``), that the
    start of each is valid in the ``source`` format (UTF-8, one JSON object a line or one JSON list, a
    Parquet/Arrow table, CSV rows no wider than their header), that its records have the fields the builder
    named by ``_component_`` reads (``longalpaca_dataset``: string ``instruction`` and ``output``;
    ``packed_blocks_dataset``: the string ``column``), and that the files hold at least one record. Hub
    datasets and ``hf://`` paths are skipped (not checkable offline). Whether the data fills one training
    block needs the tokenizer: the builders raise a :class:`~longlora_tune.errors.LongLoRAConfigError` for
    that, so build the dataset before the model.

    Args:
        dataset_cfg: the config's ``dataset`` section, a dict or ``DictConfig``.
        sample_bytes: bytes read from the start of each file (extended to the end of the first record); the
            builders check the rest when they read it.

    Raises:
        LongLoRAConfigError: the first problem, as one line naming the file (and line) and the fix.
    """
    default_source, fields = builder_fields(dataset_cfg)
    source = dataset_cfg.get("source", default_source)
    if source is None:
        return
    found = local_data_files(
        str(source), dataset_cfg.get("data_files", None), str(dataset_cfg.get("split", "train"))
    )
    if found is not None:
        _check_files(*found, fields, sample_bytes)


def diagnose_local_files(
    source: str, data_files: DataFiles, split: str = "train", fields: Optional[RecordFields] = None
) -> None:
    """Check the whole of every local data file; the builders call it when ``datasets`` fails to read them.

    Args:
        source: ``dataset.source``.
        data_files: ``dataset.data_files``.
        split: ``dataset.split``.
        fields: the builder's record fields, or None to check only the format.

    Raises:
        LongLoRAConfigError: the first problem found (file, line, fix); nothing is raised when none is found.
    """
    found = local_data_files(source, data_files, split)
    if found is not None:
        _check_files(*found, fields, None)


def _root_cause(error: BaseException) -> str:
    # datasets wraps the reader's error (DatasetGenerationError from ArrowInvalid ...): report the innermost.
    seen = {id(error)}
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        error = inner
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_records(
    source: str,
    *,
    data_files: DataFiles = None,
    split: str = "train",
    revision: Optional[str] = None,
    fields: Optional[RecordFields] = None,
    fresh: bool = False,
) -> Any:
    """:func:`longlora_tune.data._load.load_records`, failing in one line instead of a ``datasets`` traceback.

    Local files are checked to exist first; when ``datasets`` cannot read them, the whole files are checked
    (:func:`diagnose_local_files`) to name the file, line and fix. The text ``fields`` of CSV files are read
    as strings: pandas would make a column of numbers numeric, but a document of digits is still text.
    Every string is checked to be UTF-8 once loaded, because pyarrow's JSON reader does not check it and
    a bad byte would otherwise fail only when that record is read, mid-tokenization.

    Args:
        source: ``dataset.source``.
        data_files: ``dataset.data_files``.
        split: ``dataset.split``.
        revision: hub revision.
        fields: the builder's record fields, used to locate a bad record when the read fails.
        fresh: read local files again instead of ``datasets``' cache of them, which is keyed by their path,
            size and modification time and so serves the old records after an edit that keeps both
            (``cp -p``, ``rsync -t``). For a caller that has keyed its own cache on the files' content.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        LongLoRAConfigError: missing or unreadable files, or a hub dataset that cannot be loaded.
    """
    import datasets
    import pyarrow as pa

    from longlora_tune.data._load import load_records

    data_files = plain_config(data_files)
    inputs = split_inputs(source, data_files, split)
    local = local_data_files(source, data_files, split)
    options: dict[str, Any] = {}
    if fresh and inputs is not None and not any(isinstance(entry, str) for entry in inputs.entries):
        options["download_mode"] = "force_redownload"  # local files only: nothing is downloaded
    if local is not None and local[0] == "csv" and fields is not None:
        # NA cells stay null: pandas detects them before it applies a converter.
        options["converters"] = dict.fromkeys(fields.required + fields.optional + fields.somewhere, str)
    try:
        records = load_records(source, data_files=data_files, split=split, revision=revision, **options)
        records.data.validate(full=True)
        return records
    except LongLoRAConfigError:
        raise
    except (
        StopIteration,
        ValueError,
        KeyError,
        OSError,
        datasets.exceptions.DatasetsError,
        pa.ArrowException,
    ) as e:
        if local is not None:
            _check_files(*local, fields, None)
        where = ", ".join(str(p) for p in local[1][:3]) if local is not None else f"dataset.source={source}"
        fix = (
            "check the files' format against dataset.source"
            if local is not None
            else "check dataset.source (a hub id), dataset.revision and the network, or use local files"
        )
        raise LongLoRAConfigError(f"cannot read {where} ({_root_cause(e)}); {fix}") from e
