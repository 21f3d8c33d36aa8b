"""Up-front config validation of the training recipe (longlora_tune/config_checks.py).

Everything here runs without a process group or a model: the checks read the config, the tiny base model's
folder and whether CUDA exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from longlora_tune import config_checks as cc
from longlora_tune import tiny
from longlora_tune.errors import LongLoRAConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "longlora_tune" / "configs"
TINY = CONFIGS / "tiny_demo.yaml"
TINY_SFT = CONFIGS / "tiny_longalpaca.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    base = tiny.make_hf_checkpoint(root / "base")
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=4)
    return {"root": root, "base": base, "corpus": corpus, "cache": root / "cache"}


def _cfg(assets: dict[str, Path], out: Path, config: Path = TINY, **extra: object):
    """A shipped tiny config pointed at the test's base model, with ``key=value`` overrides."""
    values = {"checkpoint_dir": assets["base"], "output_dir": out, **extra}
    if config == TINY:
        values = {"dataset.data_files": assets["corpus"], "dataset.cache_dir": assets["cache"], **values}
    cfg = OmegaConf.load(config)
    cfg.merge_with_dotlist([f"{k}={v}" for k, v in values.items()])
    return cfg


# ----------------------------------------------------------------------------- moved from the recipe tests


def test_training_length_must_fit_model_and_group():
    with pytest.raises(LongLoRAConfigError, match="exceeds model.max_seq_len=256"):
        cc.check_training_length(512, 256, 64)
    with pytest.raises(
        LongLoRAConfigError, match="training length 200 is not divisible by the S2 group size 64"
    ):
        cc.check_training_length(200, 256, 64)
    cc.check_training_length(256, 256, None)  # full attention: any length up to max_seq_len


def test_missing_tokenizer_is_reported(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o", **{"tokenizer.path": tmp_path / "none.model"})
    with pytest.raises(LongLoRAConfigError, match=r"tokenizer not found: .*none.model.*tune download"):
        cc.validate_config(cfg, world_size=1)


def test_missing_base_model_names_path_and_download_command(assets, tmp_path):
    missing = tmp_path / "Llama-2-7b-hf"
    cfg = _cfg(assets, tmp_path / "o", checkpoint_dir=missing)
    with pytest.raises(LongLoRAConfigError) as e:
        cc.validate_config(cfg, world_size=1)
    assert str(e.value) == (
        f"model config not found: {missing}/config.json; download the base model with: "
        f'tune download meta-llama/Llama-2-7b-hf --output-dir {missing} --ignore-patterns "*.pth"'
    )


def test_output_dir_inside_checkpoint_dir_is_refused(assets):
    cfg = _cfg(assets, assets["base"] / "out")
    with pytest.raises(LongLoRAConfigError, match="is inside checkpoint_dir"):
        cc.validate_config(cfg, world_size=1)


def test_flex_backend_is_refused_for_cpu_training(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o")
    cfg.device = "cpu"
    cfg.model.s2_backend = "flex"
    with pytest.raises(LongLoRAConfigError, match="s2_backend=flex cannot train on CPU"):
        cc.validate_config(cfg, world_size=1)
    cfg.model.s2_backend = "sdpa"
    cc.validate_config(cfg, world_size=1)


def test_world_size_must_divide_global_batch(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o")
    assert cc.validate_config(cfg, world_size=2) == 2
    with pytest.raises(
        LongLoRAConfigError, match="global_batch_size=4 is not divisible by batch_size=1 x world_size=3"
    ):
        cc.validate_config(cfg, world_size=3)


def test_gradient_accumulation_steps_from_global_batch():
    assert cc.gradient_accumulation_steps(64, 1, 8) == 8
    assert cc.gradient_accumulation_steps(64, 2, 8) == 4
    with pytest.raises(LongLoRAConfigError, match="batch_size=0 must be a positive integer"):
        cc.gradient_accumulation_steps(64, 0, 8)


def test_dataset_size_must_fill_a_step():
    with pytest.raises(LongLoRAConfigError, match="no full block of 256 tokens"):
        cc.check_dataset_size(0, 256, 64, 8)
    with pytest.raises(LongLoRAConfigError, match="yields 40 blocks .* global_batch_size=64"):
        cc.check_dataset_size(40, 256, 64, 8)
    assert cc.check_dataset_size(130, 256, 64, 8) == 2


def test_training_length_is_the_first_length_set():
    cfg = OmegaConf.create(
        {"dataset": {"block_size": 128, "max_seq_len": 64}, "tokenizer": {"max_seq_len": 32}}
    )
    assert cc.training_length(cfg) == 128
    cfg.dataset.block_size = None
    assert cc.training_length(cfg) == 64
    cfg.dataset.max_seq_len = None
    assert cc.training_length(cfg) == 32
    cfg.tokenizer.max_seq_len = None
    assert cc.training_length(cfg) is None


# --------------------------------------------------------------------- SFT settings (tiny_longalpaca.yaml)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"dataset.packed": "true", "model.s2_backend": "flash"}, "dataset.packed=true needs an S2 backend"),
        ({"model.s2_wrap_around": "true"}, "s2_wrap_around=true lets the first tokens attend the padding"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of=0 must be a positive integer or null"),
        ({"epochs": 2}, "set exactly one of max_steps and epochs"),
        ({"max_steps": "null"}, "set exactly one of max_steps and epochs"),
        ({"epochs": 0, "max_steps": "null"}, "epochs=0 must be >= 1"),
    ],
)
def test_bad_sft_settings_are_refused(assets, tmp_path, extra, message):
    with pytest.raises(LongLoRAConfigError, match=re.escape(message)):
        cc.validate_config(_cfg(assets, tmp_path / "o", TINY_SFT, **extra), world_size=1)


def test_packing_with_full_attention_or_wrap_around_is_accepted(assets, tmp_path):
    for extra in (
        {"dataset.packed": "true", "model.s2_wrap_around": "true"},
        {"dataset.packed": "true", "model.s2_backend": "flash", "model.use_full_attn": "true"},
    ):
        assert cc.validate_config(_cfg(assets, tmp_path / "o", TINY_SFT, **extra), world_size=1) == 2
        cc.check_sft_batching(_cfg(assets, tmp_path / "o", TINY_SFT, **extra))


def test_shipped_configs_pass_the_checks_that_need_no_files(tmp_path):
    """Every shipped training config gets past everything but the base-model files it names."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        cfg.output_dir, cfg.checkpoint_dir = str(tmp_path / "o"), str(tmp_path / "no_base")
        with pytest.raises(LongLoRAConfigError, match=r"model config not found: .*no_base/config.json"):
            cc.validate_config(cfg, world_size=2 if path.stem.startswith("tiny") else 8)
