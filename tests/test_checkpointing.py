"""Checkpoint files: atomic folders, pruning, trainable-state round trip, HF loading and export config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from longlora_tune import checkpointing, export, tiny
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.schedulers import get_constant_schedule_with_warmup


def _write_ckpt(root, step, payload):
    with checkpointing.atomic_directory(root / checkpointing.step_dir_name(step)) as tmp:
        (tmp / "data.txt").write_text(payload)


def test_atomic_directory_keeps_previous_checkpoint_when_write_fails(tmp_path):
    final = tmp_path / "ckpt"
    with checkpointing.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    assert (final / "a.txt").read_text() == "old"

    with pytest.raises(RuntimeError, match="disk full"):
        with checkpointing.atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("new, half written")
            raise RuntimeError("disk full")
    # The old folder is untouched and no temporary folder is left behind.
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_directory_replaces_existing_folder_when_complete(tmp_path):
    final = tmp_path / "ckpt"
    with checkpointing.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "stale.txt").write_text("x")
    with checkpointing.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_save_is_not_listed_and_pruning_keeps_newest(tmp_path):
    for step in (10, 20, 30, 40):
        _write_ckpt(tmp_path, step, str(step))
    with pytest.raises(KeyboardInterrupt):
        with checkpointing.atomic_directory(tmp_path / checkpointing.step_dir_name(50)) as tmp:
            (tmp / "data.txt").write_text("partial")
            raise KeyboardInterrupt
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == [
        "step_000010",
        "step_000020",
        "step_000030",
        "step_000040",
    ]
    assert checkpointing.latest_checkpoint(tmp_path).name == "step_000040"
    deleted = checkpointing.prune_checkpoints(tmp_path, keep_last_n=2)
    assert [p.name for p in deleted] == ["step_000010", "step_000020"]
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    assert (tmp_path / "step_000040" / "data.txt").read_text() == "40"
    assert checkpointing.prune_checkpoints(tmp_path, keep_last_n=None) == []
    assert checkpointing.latest_checkpoint(tmp_path / "missing") is None


def test_trainable_state_round_trip_into_model(tmp_path):
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    trained = {"0.weight": src[0].weight.detach() * 2, "1.bias": torch.randn(3)}
    path = tmp_path / checkpointing.TRAINABLE_FILE
    checkpointing.save_trainable_state(trained, path)
    bias_before = dst[0].bias.detach().clone()

    loaded = checkpointing.load_trainable_state(dst, path)

    assert loaded == ["0.weight", "1.bias"]
    torch.testing.assert_close(dst[0].weight.detach(), trained["0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(dst[1].bias.detach(), trained["1.bias"], rtol=0, atol=0)
    torch.testing.assert_close(dst[0].bias.detach(), bias_before, rtol=0, atol=0)  # not in the file
    assert set(load_file(str(path))) == {"0.weight", "1.bias"}


def test_load_trainable_state_rejects_foreign_names_and_shapes(tmp_path):
    model = torch.nn.Linear(4, 3)
    path = tmp_path / "t.safetensors"
    checkpointing.save_trainable_state({"lora_a.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(LongLoRAConfigError, match="lora_a.weight"):
        checkpointing.load_trainable_state(model, path)
    checkpointing.save_trainable_state({"weight": torch.zeros(2, 2)}, path)
    with pytest.raises(LongLoRAConfigError, match=r"shape \(2, 2\).*\(3, 4\)"):
        checkpointing.load_trainable_state(model, path)


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
        with checkpointing.atomic_directory(tmp_path / checkpointing.step_dir_name(step)) as tmp:
            (tmp / "a.txt").write_text(str(step))
            (tmp / "b.txt").write_text(str(step))

    def crash_after_first_file(path, *args, **kwargs):
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.shutil, "rmtree", crash_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.prune_checkpoints(tmp_path, keep_last_n=2)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]
