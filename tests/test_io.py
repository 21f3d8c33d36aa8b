"""Atomic file writing: complete files or the old ones, never a partial file or a stray temporary."""

import errno
import json
import os
import stat

import pytest

from longlora_tune import _io
from longlora_tune.errors import CheckpointWriteError


def test_writes_bytes_text_and_json_creating_parents(tmp_path):
    out = tmp_path / "a" / "b"
    assert _io.atomic_write_bytes(out / "x.bin", b"\x00\x01") == out / "x.bin"
    assert (out / "x.bin").read_bytes() == b"\x00\x01"
    _io.atomic_write_text(out / "x.txt", "h\u00e9")
    assert (out / "x.txt").read_text(encoding="utf-8") == "h\u00e9"
    _io.atomic_write_json(out / "x.json", {"b": 1, "a": [1.5]}, sort_keys=True)
    text = (out / "x.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == {"a": [1.5], "b": 1}
    assert text.index('"a"') < text.index('"b"') and "\n  " in text  # sort_keys honoured, indent 2
    assert sorted(p.name for p in out.iterdir()) == ["x.bin", "x.json", "x.txt"]


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        _io.atomic_write_json(path, {"x": object()})
    with pytest.raises(RuntimeError), _io.atomic_open(path, "w") as f:
        f.write("partial")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_streamed_file_appears_only_when_complete(tmp_path):
    path = tmp_path / "stream.bin"
    with _io.atomic_open(path, "wb") as f:
        f.write(b"abc")
        assert not path.exists()
    assert path.read_bytes() == b"abc"


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    path = tmp_path / "w.bin"
    with _io.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_bytes(b"done")
    assert path.read_bytes() == b"done" and not tmp.exists()


def test_files_get_umask_permissions_not_mkstemp_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = _io.atomic_write_text(tmp_path / "p.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_open_rejects_read_and_append_modes(tmp_path):
    for mode in ("r", "a", "w+"):
        with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
            with _io.atomic_open(tmp_path / "m", mode):
                pass
    assert not list(tmp_path.iterdir())


def test_disk_full_is_recognised_in_every_form_writers_report_it():
    assert _io.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert _io.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors' Rust writer.
    assert _io.is_disk_full(
        Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    # torch.save: the stream error is only the context of the error that is raised.
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # noqa: B904
    except RuntimeError as e:
        assert _io.is_disk_full(e)
    assert _io.is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert not _io.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not _io.is_disk_full(RuntimeError("unexpected pos 576 vs 534"))
    assert not _io.is_disk_full(KeyboardInterrupt())


def test_disk_full_while_writing_a_file_is_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(CheckpointWriteError) as e:
        with _io.atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"no space left on device while writing {path}; ")
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, OSError)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
