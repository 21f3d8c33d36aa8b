"""Checkpoint files: atomic folders, pruning, trainable-state round trip, HF loading and export config."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from longlora_tune import _io
from longlora_tune.errors import CheckpointDamagedError, CheckpointWriteError, LongLoRAConfigError
from longlora_tune.hf import export
from longlora_tune.models import trainable
from longlora_tune.quickstart import tiny
from longlora_tune.training.checkpoint_manager import NOTHING_SAVED, CheckpointManager
from longlora_tune.training.checkpointing import format as ckpt_format
from longlora_tune.training.checkpointing import housekeeping
from longlora_tune.training.checkpointing import lineage as ckpt_lineage
from longlora_tune.training.checkpointing import rng as ckpt_rng
from longlora_tune.training.schedulers import get_constant_schedule_with_warmup


def _write_ckpt(root, step, payload):
    with _io.atomic_directory(root / ckpt_format.step_dir_name(step)) as tmp:
        (tmp / "data.txt").write_text(payload)


def test_atomic_directory_keeps_previous_checkpoint_when_write_fails(tmp_path):
    final = tmp_path / "ckpt"
    with _io.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    assert (final / "a.txt").read_text() == "old"

    with pytest.raises(RuntimeError, match="disk full"):
        with _io.atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("new, half written")
            raise RuntimeError("disk full")
    # The old folder is untouched and no temporary folder is left behind.
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_directory_replaces_existing_folder_when_complete(tmp_path):
    final = tmp_path / "ckpt"
    with _io.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "stale.txt").write_text("x")
    with _io.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_save_is_not_listed_and_pruning_keeps_newest(tmp_path):
    for step in (10, 20, 30, 40):
        _write_ckpt(tmp_path, step, str(step))
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_directory(tmp_path / ckpt_format.step_dir_name(50)) as tmp:
            (tmp / "data.txt").write_text("partial")
            raise KeyboardInterrupt
    assert [p.name for p in ckpt_lineage.list_checkpoints(tmp_path)] == [
        "step_000010",
        "step_000020",
        "step_000030",
        "step_000040",
    ]
    assert ckpt_lineage.latest_checkpoint(tmp_path).name == "step_000040"
    deleted = housekeeping.prune_checkpoints(tmp_path, keep_last_n=2)
    assert [p.name for p in deleted] == ["step_000010", "step_000020"]
    assert [p.name for p in ckpt_lineage.list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    assert (tmp_path / "step_000040" / "data.txt").read_text() == "40"
    assert housekeeping.prune_checkpoints(tmp_path, keep_last_n=None) == []
    assert ckpt_lineage.latest_checkpoint(tmp_path / "missing") is None


def test_trainable_state_round_trip_into_model(tmp_path):
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    trained = {"0.weight": src[0].weight.detach() * 2, "1.bias": torch.randn(3)}
    path = tmp_path / ckpt_format.TRAINABLE_FILE
    trainable.save_trainable_state(trained, path)
    bias_before = dst[0].bias.detach().clone()

    loaded = trainable.load_trainable_state(dst, path)

    assert loaded == ["0.weight", "1.bias"]
    torch.testing.assert_close(dst[0].weight.detach(), trained["0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(dst[1].bias.detach(), trained["1.bias"], rtol=0, atol=0)
    torch.testing.assert_close(dst[0].bias.detach(), bias_before, rtol=0, atol=0)  # not in the file
    assert set(load_file(str(path))) == {"0.weight", "1.bias"}


def test_load_trainable_state_rejects_foreign_names_and_shapes(tmp_path):
    model = torch.nn.Linear(4, 3)
    path = tmp_path / "t.safetensors"
    trainable.save_trainable_state({"lora_a.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(LongLoRAConfigError, match="lora_a.weight"):
        trainable.load_trainable_state(model, path)
    trainable.save_trainable_state({"weight": torch.zeros(2, 2)}, path)
    with pytest.raises(LongLoRAConfigError, match=r"shape \(2, 2\).*\(3, 4\)"):
        trainable.load_trainable_state(model, path)


def test_merged_hf_config_sets_rope_scaling_in_both_spellings():
    base = tiny.hf_llama_config(
        vocab_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        embed_dim=8,
        intermediate_dim=16,
        max_position_embeddings=4096,
    )
    base["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = export.merged_hf_config(base, 25, torch.bfloat16)
    assert cfg["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 25.0}
    assert cfg["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 25.0}
    assert cfg["max_position_embeddings"] == 4096 and cfg["torch_dtype"] == "bfloat16"
    assert "rope_scaling" not in base  # the base dict is not modified
    json.dumps(cfg)


def test_constant_schedule_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=4)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0])
    # Resuming from a saved state continues the same curve.
    opt2 = torch.optim.SGD([p], lr=2.0)
    sched2 = get_constant_schedule_with_warmup(opt2, num_warmup_steps=4)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="num_warmup_steps"):
        get_constant_schedule_with_warmup(opt, num_warmup_steps=-1)


def test_prune_crash_mid_delete_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """A crash while deleting an old checkpoint must not leave a half-deleted ``step_N`` behind."""
    for step in (10, 20, 30):
        with _io.atomic_directory(tmp_path / ckpt_format.step_dir_name(step)) as tmp:
            (tmp / "a.txt").write_text(str(step))
            (tmp / "b.txt").write_text(str(step))

    def crash_after_first_file(path, *args, **kwargs):
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(housekeeping.shutil, "rmtree", crash_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        housekeeping.prune_checkpoints(tmp_path, keep_last_n=2)
    assert [p.name for p in ckpt_lineage.list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]


# ----------------------------------------------------------------------------------------------------------
# Step folders: format, lineage, verification, pruning, leftovers, lock, disk full
# ----------------------------------------------------------------------------------------------------------


def _save(root, step, lineage, **overrides):
    """One tiny checkpoint as the recipe writes it; tensors carry the step so a folder's origin is visible."""
    kwargs = {
        "trainable": {"layers.0.lora_a.weight": torch.full((2, 3), float(step))},
        "optimizer_state": {
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.full((2, 3), 0.5)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "recipe_state": {
            "global_step": step,
            "epoch": 0,
            "rng": [ckpt_rng.rng_state(torch.device("cpu"))],
        },
        "config": {"max_steps": 30, "output_dir": str(root.parent)},
        "lineage": lineage,
    }
    kwargs.update(overrides)
    return ckpt_lineage.write_checkpoint(root / ckpt_format.step_dir_name(step), **kwargs)


def _names(paths):
    return [p.name for p in paths]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    cpu = torch.device("cpu")
    state = ckpt_rng.rng_state(cpu)
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(2))

    ckpt_rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), cpu)

    got = (torch.rand(3), random.random(), np.random.rand(2))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])


def test_write_checkpoint_writes_every_file_and_the_manifest_last(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    present_when_manifest_written = []
    real_write_json = ckpt_format.atomic_write_json

    def spy(path, obj, **kw):
        present_when_manifest_written.extend(sorted(p.name for p in path.parent.iterdir()))
        return real_write_json(path, obj, **kw)

    monkeypatch.setattr(ckpt_format, "atomic_write_json", spy)
    run = ckpt_lineage.start_lineage()
    ckpt = _save(root, 7, run)

    assert ckpt == root / "step_000007"
    format_files = [
        ckpt_format.TRAINABLE_FILE,
        ckpt_format.OPTIMIZER_FILE,
        ckpt_format.RECIPE_STATE_FILE,
        ckpt_format.CONFIG_FILE,
    ]
    assert present_when_manifest_written == sorted(format_files)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*format_files, ckpt_format.MANIFEST_FILE])
    assert sorted(p.name for p in root.iterdir()) == ["step_000007"]  # no temporaries left
    manifest = json.loads((ckpt / ckpt_format.MANIFEST_FILE).read_text())
    assert manifest["step"] == 7 and manifest["run_id"] == run.run_id and manifest["write_seq"] == 1
    assert manifest["resumed_from"] is None
    for name in format_files:
        import hashlib

        data = (ckpt / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt_format.verify_checkpoint(ckpt) == manifest
    # Readers give back what was written (weights_only loads).
    trained = ckpt_format.read_checkpoint_trainable(ckpt)
    torch.testing.assert_close(trained["layers.0.lora_a.weight"], torch.full((2, 3), 7.0))
    assert ckpt_format.read_recipe_state(ckpt)["global_step"] == 7
    opt = ckpt_format.read_optimizer_state(ckpt)
    torch.testing.assert_close(opt["state"][0]["exp_avg"], torch.full((2, 3), 0.5))
    assert "max_steps: 30" in (ckpt / ckpt_format.CONFIG_FILE).read_text()


def test_resumed_branch_is_latest_and_never_collides_with_the_abandoned_one(tmp_path, caplog):
    """Run A saves 5..20; run B resumes from 10, saves 11-13 and is killed: resuming picks B's 13."""
    root = tmp_path / "checkpoints"
    run_a = ckpt_lineage.start_lineage()
    for step in (5, 10, 15, 20):
        _save(root, step, run_a)
    run_b = ckpt_lineage.start_lineage(root / "step_000010")
    assert run_b.run_id != run_a.run_id
    assert run_b.resumed_from == ckpt_format.CheckpointRef("step_000010", 10, run_a.run_id, 2)
    for step in (11, 12, 13):
        _save(root, step, run_b)

    assert ckpt_lineage.latest_checkpoint(root) == root / "step_000013"
    assert ckpt_lineage.find_resumable_checkpoint(root) == root / "step_000013"
    b13 = ckpt_lineage.checkpoint_info(root / "step_000013")
    assert (b13.run_id, b13.write_seq, b13.resumed_from) == (run_b.run_id, 7, run_b.resumed_from)

    # Run C resumes B's newest and reaches step 15, which run A also wrote: A's folder is moved aside.
    run_c = ckpt_lineage.start_lineage(ckpt_lineage.find_resumable_checkpoint(root))
    with caplog.at_level("WARNING", logger="longlora_tune.training.checkpointing"):
        for step in (14, 15):
            _save(root, step, run_c)
    aside = root / f"step_000015.abandoned-{run_a.run_id[:8]}"
    assert "step_000015" in caplog.text and aside.name in caplog.text
    assert ckpt_format.read_recipe_state(aside)["global_step"] == 15
    assert ckpt_lineage.checkpoint_info(aside).run_id == run_a.run_id
    ckpt_format.verify_checkpoint(aside)  # moved whole, still intact
    assert ckpt_lineage.checkpoint_info(root / "step_000015").run_id == run_c.run_id
    assert ckpt_lineage.find_resumable_checkpoint(root) == root / "step_000015"
    # Sequence numbers keep growing across runs; the moved folder is listed by scan, not by list.
    assert [i.write_seq for i in ckpt_lineage.scan_checkpoints(root)] == list(range(1, 10))
    assert aside not in ckpt_lineage.list_checkpoints(root)
    assert aside in [i.path for i in ckpt_lineage.scan_checkpoints(root)]

    # The same run saving a step again replaces its own folder; nothing is moved aside.
    _save(root, 15, run_c)
    assert not list(root.glob("step_000015.abandoned-*-2"))
    assert ckpt_lineage.checkpoint_info(root / "step_000015").write_seq == 10


def test_saving_over_the_resumed_from_checkpoint_keeps_it_as_ancestor(tmp_path):
    root = tmp_path / "checkpoints"
    run_a = ckpt_lineage.start_lineage()
    for step in (5, 10):
        _save(root, step, run_a)
    run_b = ckpt_lineage.start_lineage(root / "step_000010")
    _save(root, 10, run_b)
    ancestor = root / f"step_000010.ancestor-{run_a.run_id[:8]}"
    assert ckpt_lineage.checkpoint_info(ancestor).run_id == run_a.run_id
    assert ckpt_lineage.checkpoint_info(root / "step_000010").run_id == run_b.run_id


def _damage_truncate_trainable(ckpt):
    f = ckpt / ckpt_format.TRAINABLE_FILE
    f.write_bytes(f.read_bytes()[:-7])
    return ckpt_format.TRAINABLE_FILE, "bytes"


def _damage_delete_optimizer(ckpt):
    (ckpt / ckpt_format.OPTIMIZER_FILE).unlink()
    return ckpt_format.OPTIMIZER_FILE, "is missing"


def _damage_garbage_recipe_state(ckpt):
    f = ckpt / ckpt_format.RECIPE_STATE_FILE
    f.write_bytes(b"\x00garbage" * (f.stat().st_size // 8) + b"\x00" * (f.stat().st_size % 8))  # same size
    return ckpt_format.RECIPE_STATE_FILE, "sha256"


def _damage_garbage_manifest(ckpt):
    (ckpt / ckpt_format.MANIFEST_FILE).write_text("{not json")
    return ckpt_format.MANIFEST_FILE, "unreadable"


@pytest.mark.parametrize(
    "damage",
    [
        _damage_truncate_trainable,
        _damage_delete_optimizer,
        _damage_garbage_recipe_state,
        _damage_garbage_manifest,
    ],
)
def test_verify_names_the_folder_and_the_damaged_file(tmp_path, damage):
    ckpt = _save(tmp_path / "checkpoints", 3, ckpt_lineage.start_lineage())
    name, why = damage(ckpt)
    with pytest.raises(CheckpointDamagedError) as e:
        ckpt_format.verify_checkpoint(ckpt)
    assert e.value.path == ckpt and e.value.file == name
    assert str(ckpt) in str(e.value) and name in str(e.value) and why in str(e.value)
    assert "\n" not in str(e.value) and isinstance(e.value, LongLoRAConfigError)


def test_readers_verify_the_file_they_load(tmp_path):
    ckpt = _save(tmp_path / "checkpoints", 3, ckpt_lineage.start_lineage())
    _damage_garbage_recipe_state(ckpt)
    with pytest.raises(CheckpointDamagedError, match="recipe_state.pt does not match its sha256"):
        ckpt_format.read_recipe_state(ckpt)
    _damage_truncate_trainable(ckpt)
    with pytest.raises(CheckpointDamagedError, match="trainable.safetensors has"):
        ckpt_format.read_checkpoint_trainable(ckpt)
    _damage_delete_optimizer(ckpt)
    with pytest.raises(CheckpointDamagedError, match="optimizer.pt is missing"):
        ckpt_format.read_optimizer_state(ckpt)


def test_find_resumable_skips_damaged_checkpoints_along_the_lineage_only(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    run_a = ckpt_lineage.start_lineage()
    for step in (5, 10, 15, 20):
        _save(root, step, run_a)
    run_b = ckpt_lineage.start_lineage(root / "step_000010")
    for step in (11, 12, 13):
        _save(root, step, run_b)
    _damage_truncate_trainable(root / "step_000013")
    _damage_delete_optimizer(root / "step_000012")
    _damage_garbage_recipe_state(root / "step_000011")
    before = sorted(p.name for p in root.iterdir())

    with caplog.at_level("WARNING", logger="longlora_tune.training.checkpointing"):
        found = ckpt_lineage.find_resumable_checkpoint(root)

    # B's damaged checkpoints are skipped back to the one B resumed from, never to A's later 15 or 20.
    assert found == root / "step_000010"
    for name in ("step_000013", "step_000012", "step_000011"):
        assert str(root / name) in caplog.text
    assert "trainable.safetensors" in caplog.text and "optimizer.pt is missing" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == before  # nothing deleted

    _damage_garbage_manifest(root / "step_000010")
    _damage_delete_optimizer(root / "step_000005")
    with pytest.raises(
        CheckpointDamagedError, match=r"holds no intact checkpoint of the latest run .*step_000013"
    ):
        ckpt_lineage.find_resumable_checkpoint(root)
    assert ckpt_lineage.find_resumable_checkpoint(tmp_path / "empty") is None


def _save_pre_manifest(root, step):
    """A checkpoint as the recipe wrote them before manifests existed."""
    with _io.atomic_directory(root / ckpt_format.step_dir_name(step)) as tmp:
        trainable.save_trainable_state({"w": torch.full((2,), float(step))}, tmp / "trainable.safetensors")
        torch.save({"state": {}, "param_groups": []}, tmp / "optimizer.pt")
        torch.save({"global_step": step}, tmp / "recipe_state.pt")
    return root / ckpt_format.step_dir_name(step)


def test_pre_manifest_checkpoints_are_accepted_with_a_warning_when_their_files_load(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _save_pre_manifest(root, step)
    with caplog.at_level("WARNING", logger="longlora_tune.training.checkpointing"):
        assert ckpt_format.verify_checkpoint(root / "step_000020") is None
    assert "no manifest.json" in caplog.text
    _damage_truncate_trainable(root / "step_000030")
    with pytest.raises(CheckpointDamagedError, match="trainable.safetensors has"):
        ckpt_format.verify_checkpoint(root / "step_000030")
    _damage_delete_optimizer(root / "step_000020")
    assert ckpt_lineage.find_resumable_checkpoint(root) == root / "step_000010"

    # A run resuming from an old checkpoint continues its lineage; its checkpoints are newer than any old one.
    run = ckpt_lineage.start_lineage(root / "step_000010")
    assert run.resumed_from == ckpt_format.CheckpointRef("step_000010", 10, None, 0)
    _save(root, 11, run)
    assert ckpt_lineage.latest_checkpoint(root) == root / "step_000011"
    (root / "step_000011" / ckpt_format.RECIPE_STATE_FILE).write_bytes(b"x")
    assert ckpt_lineage.find_resumable_checkpoint(root) == root / "step_000010"


def test_pruning_deletes_only_this_runs_oldest_and_never_the_resumed_from(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    run_a = ckpt_lineage.start_lineage()
    for step in (5, 10, 15, 20):
        _save(root, step, run_a)
    run_b = ckpt_lineage.start_lineage(root / "step_000010")
    deleted = []
    with caplog.at_level("INFO", logger="longlora_tune.training.checkpointing"):
        for step in (11, 12, 13):
            _save(root, step, run_b)
            deleted += housekeeping.prune_checkpoints(
                root, 1, run_id=run_b.run_id, protected=[run_b.resumed_from_path]
            )
    assert _names(deleted) == ["step_000011", "step_000012"]
    assert _names(ckpt_lineage.list_checkpoints(root)) == [
        "step_000005",
        "step_000010",
        "step_000013",
        "step_000015",
        "step_000020",
    ]
    assert "keeping 4 checkpoint(s) of other runs" in caplog.text and "step_000020" in caplog.text
    # Even keep_last_n=1 for run A now cannot touch the checkpoint run B resumed from when it is protected.
    pruned_a = housekeeping.prune_checkpoints(root, 1, run_id=run_a.run_id, protected=[root / "step_000010"])
    assert _names(pruned_a) == ["step_000005", "step_000015"]
    assert (root / "step_000010").is_dir() and (root / "step_000020").is_dir()
    # A protected checkpoint of the current run is kept too.
    _save(root, 14, run_b)
    assert (
        housekeeping.prune_checkpoints(root, 1, run_id=run_b.run_id, protected=[root / "step_000013"]) == []
    )


def test_clean_leftovers_removes_interrupted_saves_and_restores_a_half_replaced_folder(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    run = ckpt_lineage.start_lineage()
    _save(root, 20, run)
    partial = root / ".step_000030.tmp-abc123"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"x" * 3000)
    replaced = root / ".step_000020.old-1234abcd"  # step_000020 exists: the replace finished
    replaced.mkdir()
    (replaced / "a").write_bytes(b"y" * 10)
    half_replaced = _save(root, 40, run).rename(root / ".step_000040.old-99999999")  # step_000040 missing
    deleting = root / ".deleting-step_000010-deadbeef"
    deleting.mkdir()
    unrelated = root / ".keep-me"
    unrelated.write_text("x")

    with caplog.at_level("INFO", logger="longlora_tune.training.checkpointing"):
        removed = housekeeping.clean_leftovers(root)

    assert sorted(_names(removed)) == sorted([partial.name, replaced.name, deleting.name])
    assert "2.9 KiB" in caplog.text and partial.name in caplog.text
    assert not half_replaced.exists() and ckpt_format.verify_checkpoint(root / "step_000040")
    assert sorted(p.name for p in root.iterdir()) == [".keep-me", "step_000020", "step_000040"]
    assert housekeeping.clean_leftovers(tmp_path / "missing") == []


_HOLD_LOCK = """
import sys
from longlora_tune.training.checkpointing.housekeeping import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_output_dir_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LongLoRAConfigError) as e:
            housekeeping.OutputDirLock(out).acquire()
        msg = str(e.value)
        assert f"output_dir {out} is in use by pid {holder.pid} on host {socket.gethostname()} since " in msg
        assert "wait for that run to end or use another output_dir" in msg
    finally:
        holder.kill()
        holder.wait()
    # The killed run's lock file is still there, but the kernel released its flock: it is taken over.
    assert (out / housekeeping.LOCK_FILE).exists()
    with housekeeping.OutputDirLock(out) as lock:
        assert lock.held
        assert json.loads((out / housekeeping.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(LongLoRAConfigError, match=f"in use by pid {os.getpid()}"):
            housekeeping.OutputDirLock(out).acquire()
    assert not lock.held
    housekeeping.OutputDirLock(out).acquire().release()  # free again after release


def test_disk_full_during_a_save_names_the_intact_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    root = tmp_path / "checkpoints"
    run = ckpt_lineage.start_lineage()
    first = _save(root, 10, run)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step" in str(obj):  # the optimizer state
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        _save(root, 20, run)
    # The tensors to write: the trainable 2x3 float32 (24 B), the optimizer's step (4 B) and exp_avg (24 B).
    assert str(e.value) == (
        f"no space left on device while writing {root / 'step_000020' / 'optimizer.pt'} "
        "(the whole output needs about 52 B); "
        f"the previous checkpoint {first} is intact; free disk space, then resume with "
        f"resume_from_checkpoint={first}"
    )
    assert sorted(p.name for p in root.iterdir()) == ["step_000010"]  # temporary folder removed
    ckpt_format.verify_checkpoint(first)


def test_torch_save_disk_full_error_and_no_previous_checkpoint(tmp_path, monkeypatch):
    def torch_style_failure(obj, f, *args, **kwargs):
        # What torch 2.13 raises on a full disk: the stream error is only the context of a later one.
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # noqa: B904

    monkeypatch.setattr(torch, "save", torch_style_failure)
    root = tmp_path / "checkpoints"
    with pytest.raises(
        CheckpointWriteError,
        match=r"step_000001/optimizer.pt \(the whole output needs about 52 B\); there is no previous",
    ):
        _save(root, 1, ckpt_lineage.start_lineage())
    assert list(root.iterdir()) == []


def test_disk_full_after_resume_names_the_resumed_from_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    a10 = _save(root, 10, ckpt_lineage.start_lineage())
    run_b = ckpt_lineage.start_lineage(a10)

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_format, "save_trainable_state", full)
    with pytest.raises(CheckpointWriteError, match=f"the previous checkpoint {a10} is intact"):
        _save(root, 11, run_b)
    # Any other failure is not turned into a disk-full message.
    monkeypatch.setattr(ckpt_format, "save_trainable_state", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _save(root, 11, run_b)
    assert sorted(p.name for p in root.iterdir()) == ["step_000010"]


def test_report_errors_exits_4_with_one_line_for_a_full_disk(capsys):
    from longlora_tune.errors import WRITE_FAILED_EXIT_CODE, report_errors

    @report_errors
    def main():
        raise CheckpointWriteError("/o/checkpoints/step_000002", previous="/o/checkpoints/step_000001")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == WRITE_FAILED_EXIT_CODE == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "longlora_tune: error: no space left on device while writing /o/checkpoints/step_000002"
    )


def test_pruning_with_ancestors_bounds_a_many_times_resumed_run(tmp_path):
    """A preempted job resumed again and again keeps keep_last_n checkpoints plus the resumed-from one."""
    root = tmp_path / "checkpoints"
    run_a = ckpt_lineage.start_lineage()
    for step in (1, 2, 3, 4):
        _save(root, step, run_a)
    run_b = ckpt_lineage.start_lineage(root / "step_000002")  # branches off: A's 3 and 4 are abandoned
    for step in (3, 4):
        _save(root, step, run_b)
    run_c = ckpt_lineage.start_lineage(root / "step_000004")
    for step in (5, 6, 7):
        _save(root, step, run_c)

    deleted = housekeeping.prune_checkpoints(root, 2, run_id=run_c.run_id, include_ancestors=True)

    # C's lineage is A1, A2, B3, B4 (resumed from: kept), C5, C6, C7; the newest two of it are kept.
    assert _names(deleted) == ["step_000001", "step_000002", "step_000003", "step_000005"]
    assert _names(ckpt_lineage.list_checkpoints(root)) == ["step_000004", "step_000006", "step_000007"]
    assert ckpt_lineage.checkpoint_info(root / "step_000004").run_id == run_b.run_id
    abandoned = sorted(p.name for p in root.glob("step_*.abandoned-*"))
    assert abandoned == [
        f"step_000003.abandoned-{run_a.run_id[:8]}",
        f"step_000004.abandoned-{run_a.run_id[:8]}",
    ]


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "sub/trainable.safetensors", "..", "a\\b"])
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, name):
    ckpt = _save(tmp_path / "checkpoints", 3, ckpt_lineage.start_lineage())
    (tmp_path / "outside.txt").write_text("someone else's file")
    manifest = json.loads((ckpt / ckpt_format.MANIFEST_FILE).read_text())
    manifest["files"][name] = {"size": 19, "sha256": "0" * 64}
    (ckpt / ckpt_format.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointDamagedError, match="not a file name inside the checkpoint folder"):
        ckpt_format.verify_checkpoint(ckpt)


def _rewrite_listed(ckpt, name, text):
    """Replace a checkpoint file and its manifest entry, as a folder made elsewhere would have them."""
    import hashlib

    data = text.encode()
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / ckpt_format.MANIFEST_FILE).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / ckpt_format.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_saved_config_is_read_as_data_without_resolving_interpolations(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGLORA_TEST_SECRET", "hunter2")
    ckpt = _save(tmp_path / "checkpoints", 3, ckpt_lineage.start_lineage())
    # Its config.yaml asks for this machine's environment.
    text = "max_steps: 30\nlr: 2.0e-05\nnote: ${oc.env:LONGLORA_TEST_SECRET}\n"
    _rewrite_listed(ckpt, ckpt_format.CONFIG_FILE, text)
    saved = ckpt_format.read_saved_config(ckpt)
    assert saved == {"max_steps": 30, "lr": 2e-5, "note": "${oc.env:LONGLORA_TEST_SECRET}"}
    _rewrite_listed(ckpt, ckpt_format.CONFIG_FILE, "a: [unclosed\n")
    with pytest.raises(CheckpointDamagedError, match="config.yaml is not valid YAML"):
        ckpt_format.read_saved_config(ckpt)


def test_a_run_stopped_before_its_first_checkpoint_is_told_a_new_run_starts_over(tmp_path):
    # The stop line of a run that saved nothing (its output folder not even made yet); the line naming an
    # intact checkpoint is checked by the recipe's Ctrl-C test.
    manager = CheckpointManager(
        tmp_path / "out" / "checkpoints",
        cfg=OmegaConf.create({}),
        device=torch.device("cpu"),
        global_batch_size=1,
    )
    assert manager.stop_hint(2) == f"at step 2; {NOTHING_SAVED}"
    assert not (tmp_path / "out").exists()
