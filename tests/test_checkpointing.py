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


def test_load_hf_model_state_converts_names_and_permutes_qk(tmp_path):
    from torchtune.models.convert_weights import tune_to_hf

    ckpt = tiny.make_hf_checkpoint(tmp_path / "base", num_kv_heads=2, with_tokenizer=False)
    hf = load_file(str(ckpt / "model.safetensors"))
    sd = checkpointing.load_hf_model_state(ckpt)
    assert "tok_embeddings.weight" in sd and "layers.1.attn.q_proj.weight" in sd and "norm.scale" in sd
    # The conversion is torchtune's: converting back gives the original tensors.
    back = tune_to_hf(sd, num_heads=4, num_kv_heads=2, dim=64)
    assert set(back) == set(hf)
    for k in hf:
        torch.testing.assert_close(back[k], hf[k], rtol=0, atol=0)
    kw = checkpointing.llama2_kwargs_from_hf_config(checkpointing.read_hf_config(ckpt))
    assert kw["num_kv_heads"] == 2 and kw["original_max_seq_len"] == 64
    assert kw["existing_rope_scaling_factor"] == 1.0


def test_missing_checkpoint_names_path_and_download_command(tmp_path):
    with pytest.raises(LongLoRAConfigError) as e:
        checkpointing.read_hf_config(tmp_path / "nope", repo_id="meta-llama/Llama-2-13b-hf")
    msg = str(e.value)
    assert str(tmp_path / "nope" / "config.json") in msg
    assert f"tune download meta-llama/Llama-2-13b-hf --output-dir {tmp_path / 'nope'}" in msg
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text("{}")
    with pytest.raises(LongLoRAConfigError, match=r"model weights .*tune download"):
        checkpointing.hf_weight_files(tmp_path / "cfg_only")


def test_existing_rope_factor_is_read(tmp_path):
    ckpt = tiny.make_hf_checkpoint(
        tmp_path / "b", rope_scaling={"type": "linear", "factor": 8.0}, with_tokenizer=False
    )
    kw = checkpointing.llama2_kwargs_from_hf_config(checkpointing.read_hf_config(ckpt))
    assert kw["existing_rope_scaling_factor"] == 8.0
    with pytest.raises(LongLoRAConfigError, match="dynamic"):
        checkpointing.llama2_kwargs_from_hf_config(
            {**checkpointing.read_hf_config(ckpt), "rope_scaling": {"type": "dynamic", "factor": 2.0}}
        )


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


def test_merged_hf_checkpoint_is_sharded_and_folds_lora(tmp_path):
    from torchtune.models.convert_weights import tune_to_hf

    base = tiny.make_hf_checkpoint(tmp_path / "base", with_tokenizer=False)
    (base / "tokenizer.model").write_bytes(b"sp")
    sd = checkpointing.load_hf_model_state(base)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, generator=gen)
    b = torch.randn(64, 8, generator=gen)
    expected_q = sd["layers.0.attn.q_proj.weight"] + (16.0 / 8) * b @ a
    sd["layers.0.attn.q_proj.lora_a.weight"] = a
    sd["layers.0.attn.q_proj.lora_b.weight"] = b
    expected = dict(sd, **{"layers.0.attn.q_proj.weight": expected_q})
    del expected["layers.0.attn.q_proj.lora_a.weight"], expected["layers.0.attn.q_proj.lora_b.weight"]
    expected = tune_to_hf(expected, num_heads=4, num_kv_heads=4, dim=64)

    out = export.save_merged_hf_checkpoint(
        sd,
        tmp_path / "hf",
        base_checkpoint_dir=base,
        rope_scaling_factor=4,
        lora_rank=8,
        lora_alpha=16.0,
        dtype=torch.float32,
        max_shard_bytes=100_000,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded = {}
    for name in shards:
        loaded.update(load_file(str(out / name)))
    assert set(loaded) == set(expected) == set(index["weight_map"])
    for k in expected:
        torch.testing.assert_close(loaded[k], expected[k], rtol=1e-6, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["factor"] == 4.0
    assert (out / "tokenizer.model").read_bytes() == b"sp"


def test_llama2_kwargs_read_transformers5_rope_parameters():
    """transformers 5 writes the RoPE base and factor only inside ``rope_parameters``."""
    from longlora_tune.checkpointing import llama2_kwargs_from_hf_config

    base = {
        "vocab_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
    }
    kw = llama2_kwargs_from_hf_config(
        {**base, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}
    )
    assert kw["rope_base"] == 500000.0
    assert kw["existing_rope_scaling_factor"] == 4.0
    with pytest.raises(LongLoRAConfigError, match="yarn"):
        llama2_kwargs_from_hf_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})


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
