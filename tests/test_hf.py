"""Reading a Hugging Face base folder once: config, builder arguments, RoPE factor, weights, merged export."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from safetensors.torch import load_file

from longlora_tune import _io
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.hf import export
from longlora_tune.hf.base import HFBaseModel
from longlora_tune.models.longlora import LongLoRAModelInfo
from longlora_tune.quickstart import tiny


def _config(**extra) -> dict:
    base = {
        "vocab_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
    }
    return {**base, **extra}


def test_load_state_dict_converts_names_and_permutes_qk(tmp_path):
    from torchtune.models.convert_weights import tune_to_hf

    ckpt = tiny.make_hf_checkpoint(tmp_path / "base", num_kv_heads=2, with_tokenizer=False)
    hf = load_file(str(ckpt / "model.safetensors"))
    base = HFBaseModel.read(ckpt)
    sd = base.load_state_dict()
    assert "tok_embeddings.weight" in sd and "layers.1.attn.q_proj.weight" in sd and "norm.scale" in sd
    # The conversion is torchtune's: converting back gives the original tensors.
    back = tune_to_hf(sd, num_heads=4, num_kv_heads=2, dim=64)
    assert set(back) == set(hf)
    for k in hf:
        torch.testing.assert_close(back[k], hf[k], rtol=0, atol=0)
    assert base.builder_kwargs["num_kv_heads"] == 2 and base.original_max_seq_len == 64
    assert base.rope_scaling_factor == 1.0
    assert {t.dtype for t in base.load_state_dict(dtype=torch.bfloat16).values()} == {torch.bfloat16}


def test_missing_checkpoint_names_path_and_download_command(tmp_path):
    with pytest.raises(LongLoRAConfigError) as e:
        HFBaseModel.read(tmp_path / "nope", repo_id="meta-llama/Llama-2-13b-hf")
    msg = str(e.value)
    assert str(tmp_path / "nope" / "config.json") in msg
    assert f"tune download meta-llama/Llama-2-13b-hf --output-dir {tmp_path / 'nope'}" in msg
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text(json.dumps(_config()))
    with pytest.raises(LongLoRAConfigError, match=r"model weights .*tune download"):
        HFBaseModel.read(tmp_path / "cfg_only")
    (tmp_path / "cfg_only" / "config.json").write_text("{}")
    with pytest.raises(LongLoRAConfigError, match="lacks vocab_size.*not a Hugging Face Llama config"):
        HFBaseModel.read(tmp_path / "cfg_only")
    (tmp_path / "cfg_only" / "config.json").write_text("{not json")
    with pytest.raises(LongLoRAConfigError, match="cannot read"):
        HFBaseModel.read(tmp_path / "cfg_only")


def test_existing_rope_factor_is_read(tmp_path):
    ckpt = tiny.make_hf_checkpoint(
        tmp_path / "b", rope_scaling={"type": "linear", "factor": 8.0}, with_tokenizer=False
    )
    assert HFBaseModel.read(ckpt).rope_scaling_factor == 8.0
    config = json.loads((ckpt / "config.json").read_text())
    config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(LongLoRAConfigError, match="dynamic"):
        HFBaseModel.read(ckpt)


def test_builder_kwargs_read_transformers5_rope_parameters(tmp_path):
    """transformers 5 writes the RoPE base and factor only inside ``rope_parameters``."""
    config = _config(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0})
    base = HFBaseModel(tmp_path, config, weight_files=())
    assert base.builder_kwargs["rope_base"] == 500000.0
    assert base.rope_scaling_factor == 4.0
    with pytest.raises(LongLoRAConfigError, match="yarn"):
        _ = HFBaseModel(
            tmp_path, _config(rope_scaling={"type": "yarn", "factor": 4.0}), ()
        ).rope_scaling_factor


def test_merged_hf_checkpoint_is_sharded_and_folds_lora(tmp_path):
    from torchtune.models.convert_weights import tune_to_hf

    base_dir = tiny.make_hf_checkpoint(tmp_path / "base", with_tokenizer=False)
    (base_dir / "tokenizer.model").write_bytes(b"sp")
    base = HFBaseModel.read(base_dir)
    sd = base.load_state_dict()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, generator=gen)
    b = torch.randn(64, 8, generator=gen)
    expected_q = sd["layers.0.attn.q_proj.weight"] + (16.0 / 8) * b @ a
    sd["layers.0.attn.q_proj.lora_a.weight"] = a
    sd["layers.0.attn.q_proj.lora_b.weight"] = b
    expected = dict(sd, **{"layers.0.attn.q_proj.weight": expected_q})
    del expected["layers.0.attn.q_proj.lora_a.weight"], expected["layers.0.attn.q_proj.lora_b.weight"]
    expected = tune_to_hf(expected, num_heads=4, num_kv_heads=4, dim=64)
    info = LongLoRAModelInfo(
        group_size=64, rope_scaling_factor=4.0, lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj",),
        max_seq_len=256,
    )  # fmt: skip
    out = export.save_merged_hf_checkpoint(
        sd, tmp_path / "hf", base=base, model_info=info, dtype=torch.float32, max_shard_bytes=100_000
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
    # Readable by a serving account like every other output (safetensors alone writes 0600).
    mode = 0o666 & ~_io.current_umask()
    assert {stat.S_IMODE((out / name).stat().st_mode) for name in shards} == {mode}
