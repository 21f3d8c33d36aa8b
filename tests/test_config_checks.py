"""Up-front config validation of the training recipe (longlora_tune/config/validation.py).

Everything here runs without a process group or a model: the checks read the config, the tiny base model's
folder and whether CUDA exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks.tune_run import tune_command
from longlora_tune import errors, resources
from longlora_tune.config import validation as cc
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.quickstart import tiny

REPO = Path(__file__).resolve().parents[1]
CONFIGS = resources.configs_dir()
TINY = CONFIGS / "tiny_demo.yaml"
TINY_SFT = CONFIGS / "tiny_longalpaca.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    base = tiny.make_hf_checkpoint(root / "base")
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=4)
    sft = tiny.make_longalpaca_json(root / "longalpaca.json", n=4)
    return {"root": root, "base": base, "corpus": corpus, "sft": sft, "cache": root / "cache"}


def _cfg(assets: dict[str, Path], out: Path, config: Path = TINY, **extra: object):
    """A shipped tiny config pointed at the test's base model, with ``key=value`` overrides."""
    values = {"checkpoint_dir": assets["base"], "output_dir": out, **extra}
    if config == TINY:
        values = {"dataset.data_files": assets["corpus"], "dataset.cache_dir": assets["cache"], **values}
    if config == TINY_SFT:
        values = {"dataset.data_files": assets["sft"], **values}
    cfg = OmegaConf.load(config)
    cfg.merge_with_dotlist([f"{k}={v}" for k, v in values.items()])
    return cfg


def _steps(cfg, *, world_size: int) -> int:
    """The gradient accumulation steps :func:`validate_config` derives (after every check passed)."""
    return cc.validate_config(cfg, world_size=world_size).gradient_accumulation_steps


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


@pytest.mark.parametrize(
    "config, repo",
    [("tiny_demo", "meta-llama/Llama-2-7b-hf"), ("tiny_demo_llama3", "<hf-repo-id>"),
     ("tiny_demo_qwen2", "<hf-repo-id>"), ("hf_checkpoint", "<hf-repo-id>"),
     ("llama3_8b_64k", "meta-llama/Meta-Llama-3-8B")],
)  # fmt: skip
def test_download_hint_names_the_familys_repo_or_none(tmp_path, config, repo):
    """Llama 2's repository only for a Llama 2 builder: Llama 3, Qwen and hf_checkpoint users never see it."""
    missing = tmp_path / "model"
    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    cfg.checkpoint_dir, cfg.output_dir, cfg.dataset.data_files = str(missing), str(tmp_path / "o"), "x.jsonl"
    with pytest.raises(LongLoRAConfigError) as e:
        cc.validate_config(cfg, world_size=2 if config.startswith("tiny") else 8)
    assert str(e.value).endswith(f'tune download {repo} --output-dir {missing} --ignore-patterns "*.pth"')


def test_hf_checkpoint_sections_are_completed_from_the_folder(assets, tmp_path):
    cfg = OmegaConf.load(CONFIGS / "hf_checkpoint.yaml")
    cfg.merge_with_dotlist(
        [f"checkpoint_dir={assets['base']}", f"output_dir={tmp_path / 'o'}",
         f"dataset.data_files={assets['corpus']}", "max_seq_len=256", "device=cpu", "global_batch_size=8",
         "memory_budget_gib=8"]
    )  # fmt: skip
    assert cc.validate_config(cfg, world_size=8).gradient_accumulation_steps == 1
    # The tiny Llama 2 folder (tokenizer.model): its builder, shapes and tokenizer; the config's keys kept.
    assert cfg.model._component_ == "longlora_tune.models.longlora_llama2"
    assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.model.max_seq_len) == (2, 64, 256)
    assert dict(cfg.tokenizer) == {
        "_component_": "torchtune.models.llama2.llama2_tokenizer",
        "path": str(assets["base"] / "tokenizer.model"),
        "max_seq_len": 256,
    }
    assert cc.training_length(cfg) == 256


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
    assert _steps(cfg, world_size=2) == 2
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
        assert _steps(_cfg(assets, tmp_path / "o", TINY_SFT, **extra), world_size=1) == 2
        cc.check_sft_batching(_cfg(assets, tmp_path / "o", TINY_SFT, **extra))


def test_shipped_configs_pass_the_checks_that_need_no_files(tmp_path):
    """Every shipped training config gets past everything but the base-model files it names."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        cfg.output_dir, cfg.checkpoint_dir = str(tmp_path / "o"), str(tmp_path / "no_base")
        if OmegaConf.is_missing(cfg.dataset, "data_files"):
            cfg.dataset.data_files = str(tmp_path / "corpus.jsonl")  # hf_checkpoint: no corpus is assumed
        with pytest.raises(LongLoRAConfigError, match=r"model config not found: .*no_base/config.json"):
            cc.validate_config(cfg, world_size=2 if path.stem.startswith("tiny") else 8)


# ------------------------------------------------------------------------------------------- key schema


def _error(cfg, world_size: int = 1) -> str:
    with pytest.raises(LongLoRAConfigError) as e:
        cc.validate_config(cfg, world_size=world_size)
    return str(e.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_step": 3}, "unknown config key 'max_step'; did you mean 'max_steps'?"),
        ({"lr": 1e-4}, "unknown config key 'lr'; did you mean 'optimizer.lr'?"),
        (
            {"num_warmup_steps": 3},
            "unknown config key 'num_warmup_steps'; did you mean 'lr_scheduler.num_warmup_steps'?",
        ),
        ({"profiler": 1}, "unknown config key 'profiler'; remove it (the recipe does not read it)"),
        (
            {"optimizer.learning_rate": 1e-3},
            "optimizer.learning_rate is not an argument of torch.optim.AdamW; did you mean 'lr'?",
        ),
        (
            {"optimizer.wd": 0.1},
            "optimizer.wd is not an argument of torch.optim.AdamW; did you mean 'weight_decay'?",
        ),
        (
            {"model.lora_rnak": 4},
            "model.lora_rnak is not an argument of longlora_tune.models.longlora_llama2; "
            "did you mean 'lora_rank'?",
        ),
        (
            {"dataset.block_sise": 256},
            "dataset.block_sise is not an argument of longlora_tune.data.packed_blocks_dataset; "
            "did you mean 'block_size'?",
        ),
        (
            {"optimizer.params": "[]"},
            "optimizer.params is passed by the recipe (the trainable parameters); remove it from the config",
        ),
        (
            {"model._component_": "longlora_tune.models.nope"},
            "model._component_=longlora_tune.models.nope cannot be imported",
        ),
        ({"collate_fn": "longlora_tune.data.nope"}, "collate_fn=longlora_tune.data.nope cannot be imported"),
        ({"compile": "yes please"}, "compile='yes please' must be true or false"),
        ({"output_dir": "${nope}/out"}, "the config does not resolve: "),
    ],
)
def test_unknown_keys_are_refused_with_a_suggestion(assets, tmp_path, extra, message):
    assert _error(_cfg(assets, tmp_path / "o", **extra)).startswith(message)


def test_required_component_arguments_and_open_kwargs(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o")
    del cfg.lr_scheduler["num_warmup_steps"]
    assert _error(cfg) == (
        "lr_scheduler.num_warmup_steps is required by "
        "longlora_tune.training.schedulers.get_constant_schedule_with_warmup; set it in the config"
    )
    # DiskLogger takes **kwargs; a builder taking **knobs likewise accepts any key.
    cfg = _cfg(assets, tmp_path / "o", **{"metric_logger.anything": 1, "compile": "false"})
    assert _steps(cfg, world_size=1) == 4


def test_every_key_the_recipe_reads_is_in_the_schema():
    from longlora_tune import resources

    source = resources.recipe_path("longlora_distributed").read_text()
    read = set(re.findall(r'\bcfg\.get\(\s*"(\w+)"', source)) | set(re.findall(r"\bcfg\.(\w+)", source))
    read -= {"get"}
    assert {"max_steps", "optimizer", "save_every_n_steps"} <= read  # the scan finds the recipe's reads
    assert read <= set(cc.RECIPE_KEYS), sorted(read - set(cc.RECIPE_KEYS))


def test_suggestions():
    assert cc.suggest("learning_rate", ["params", "lr", "betas"]) == "lr"
    assert cc.suggest("wd", ["lr", "weight_decay"]) == "weight_decay"
    assert cc.suggest("max_step", list(cc.RECIPE_KEYS)) == "max_steps"
    assert cc.suggest("zzz", list(cc.RECIPE_KEYS)) is None


# ------------------------------------------------------------------------------- values: types and ranges


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps=0 must be a positive integer"),
        ({"save_every_n_steps": -1}, "save_every_n_steps=-1 must be an integer >= 0 or null"),
        ({"optimizer.lr": -1e-3}, "optimizer.lr=-0.001 must be a positive number"),
        ({"optimizer.lr": 0}, "optimizer.lr=0 must be a positive number"),
        ({"optimizer.lr": "fast"}, "optimizer.lr='fast' must be a positive number"),
        ({"optimizer.weight_decay": -0.1}, "optimizer.weight_decay=-0.1 must be a number >= 0"),
        ({"optimizer.betas": "[0.9,1.5]"}, "optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
        ({"keep_last_n": 0}, "keep_last_n=0 must be a positive integer or null (null = keep all)"),
        ({"clip_grad_norm": 0}, "clip_grad_norm=0 must be a positive number or null (null = no clipping)"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm=-1.0 must be a positive number or null"),
        ({"seed": -1}, "seed=-1 must be an integer in [0, 4294967295]"),
        ({"seed": 2**32}, "seed=4294967296 must be an integer in [0, 4294967295]"),
        ({"num_workers": -1}, "num_workers=-1 must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"global_batch_size": 0}, "global_batch_size=0 must be a positive integer"),
        ({"max_steps": 0}, "max_steps=0 must be >= 1"),
        ({"max_steps": 2.5}, "max_steps=2.5 must be a positive integer"),
        ({"lr_scheduler.num_warmup_steps": -1}, "lr_scheduler.num_warmup_steps=-1 must be an integer >= 0"),
        ({"loss.num_output_chunks": 0}, "loss.num_output_chunks=0 must be a positive integer"),
        ({"dataset.block_size": 0}, "dataset.block_size=0 must be a positive integer or null"),
        ({"shuffle": "sometimes"}, "shuffle='sometimes' must be true or false"),
        ({"dtype": "fp16"}, "dtype=fp16 is not supported (no loss scaling); use bf16 or fp32"),
        (
            {"trainable_extras": "[embed,lm_head]"},
            "trainable_extras=['embed', 'lm_head'] must be a subset of",
        ),
        ({"export_formats": "hf"}, "export_formats='hf' must be a list such as ['hf', 'peft', 'adapter']"),
        ({"resume_from_checkpoint": 1}, "resume_from_checkpoint=1 must be false, true or the path"),
    ],
)
def test_bad_values_are_one_line_errors(assets, tmp_path, extra, message):
    assert _error(_cfg(assets, tmp_path / "o", **extra)).startswith(message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model.lora_rank": 0}, "model.lora_rank=0 must be a positive integer (LoRA rank, 8 in LongLoRA)"),
        ({"model.lora_rank": 2.5}, "model.lora_rank=2.5 must be a positive integer"),
        ({"model.lora_alpha": 0}, "model.lora_alpha=0 must be a positive number (e.g. 16)"),
        ({"model.lora_alpha": -1.0}, "model.lora_alpha=-1.0 must be a positive number"),
        ({"model.lora_dropout": 1.0}, "model.lora_dropout=1.0 must be a number in [0, 1) (0 = no dropout)"),
        ({"model.lora_dropout": -0.1}, "model.lora_dropout=-0.1 must be a number in [0, 1)"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(assets, tmp_path, extra, message):
    assert _error(_cfg(assets, tmp_path / "o", **extra)).startswith(message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"model.s2_group_size": 64},
            "model.s2_group_size=64 and model.s2_group_size_ratio=0.25 are both set; set one of them "
            "(model.s2_group_size_ratio=null for a fixed group size, or model.s2_group_size=null)",
        ),
        (
            {"model.s2_group_size_ratio": 0.3},
            "model.s2_group_size_ratio 0.3 * model.max_seq_len 256 = 76.8 is not an integer; pick a ratio "
            "that divides model.max_seq_len or set model.s2_group_size",
        ),
        (
            {"model.s2_group_size_ratio": 1.5},
            "model.s2_group_size_ratio must be in (0, 1], got 1.5",
        ),
        (
            {"model.s2_group_size": 63, "model.s2_group_size_ratio": "null"},
            "model.s2_group_size must be even (groups are shifted by half a group), got 63",
        ),
        (
            {"model.s2_group_size": 48, "model.s2_group_size_ratio": "null"},
            "training length 256 is not divisible by the S2 group size 48; use a length that is a multiple "
            "of 48 or change model.s2_group_size",
        ),
    ],
)
def test_s2_group_errors_name_the_config_keys(assets, tmp_path, extra, message):
    assert _error(_cfg(assets, tmp_path / "o", **extra)) == message


def test_the_checks_derive_the_run_settings(assets, tmp_path):
    checked = cc.validate_config(_cfg(assets, tmp_path / "o", **{"model.lora_rank": 4}), world_size=2)
    assert (checked.training_length, checked.model.group_size, checked.model.lora_rank) == (256, 64, 4)
    assert checked.summary() == (
        "training length 256, S2 group 64, RoPE linear x4, LoRA rank 4 alpha 16, world size 2 (2 data x 1 "
        "context parallel): global batch 4 = 1 per rank x 2 x 2 accumulation steps, 40 steps"
    )
    fixed = {"model.s2_group_size": 128, "model.s2_group_size_ratio": "null", "model.use_full_attn": "true"}
    checked = cc.validate_config(_cfg(assets, tmp_path / "o", **fixed), world_size=1)
    assert checked.summary().startswith("training length 256, full attention, RoPE linear x4, LoRA rank 8")


def test_values_at_the_edge_of_their_range_are_accepted(assets, tmp_path):
    extra = {
        "save_every_n_steps": 0,
        "keep_last_n": "null",
        "clip_grad_norm": "null",
        "seed": 2**32 - 1,
        "lr_scheduler.num_warmup_steps": 0,
        "optimizer.weight_decay": 0.0,
        "trainable_extras": "[]",
        "export_formats": "[]",
        "resume_from_checkpoint": "null",
    }
    assert _steps(_cfg(assets, tmp_path / "o", **extra), world_size=1) == 4
    # torchtune seeds rank r with seed + r, which must stay a uint32.
    assert _error(_cfg(assets, tmp_path / "o", **extra), world_size=2).startswith("seed=4294967295 must be")


# --------------------------------------------------------------- global_batch_size or gradient_accumulation


def test_gradient_accumulation_steps_can_replace_global_batch_size(assets, tmp_path):
    torchtune_style = {"global_batch_size": "null", "gradient_accumulation_steps": 3, "batch_size": 2}
    cfg = _cfg(assets, tmp_path / "o", **torchtune_style)
    assert cc.batch_settings(cfg, world_size=2) == (12, 3)
    assert _steps(cfg, world_size=2) == 3
    # Both set: fine when they agree ...
    assert cc.batch_settings(_cfg(assets, tmp_path / "o", gradient_accumulation_steps=2), 2) == (4, 2)
    assert cc.batch_settings(_cfg(assets, tmp_path / "o"), 2) == (4, 2)
    # ... an error when they do not.
    with pytest.raises(LongLoRAConfigError) as e:
        cc.batch_settings(_cfg(assets, tmp_path / "o", gradient_accumulation_steps=3), 2)
    assert str(e.value) == (
        "gradient_accumulation_steps=3 disagrees with global_batch_size=4 = batch_size=1 x world_size=2 x 2; "
        "set one of them to null"
    )
    with pytest.raises(
        LongLoRAConfigError, match="neither global_batch_size nor gradient_accumulation_steps"
    ):
        cc.batch_settings(_cfg(assets, tmp_path / "o", global_batch_size="null"), 2)
    with pytest.raises(LongLoRAConfigError, match="gradient_accumulation_steps=0 must be a positive integer"):
        cc.batch_settings(
            _cfg(assets, tmp_path / "o", global_batch_size="null", gradient_accumulation_steps=0), 2
        )


# ------------------------------------------------------------------------ one message per node under torchrun


def test_only_local_rank_zero_reports_a_config_error(assets, tmp_path, monkeypatch, capsys):
    cfg = _cfg(assets, tmp_path / "o", max_step=3)
    monkeypatch.setattr(errors, "QUIET_RANK_GRACE_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as e:
        cc.validate_config_in_worker(cfg, world_size=2)
    assert e.value.code == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(LongLoRAConfigError, match="unknown config key 'max_step'"):
        cc.validate_config_in_worker(cfg, world_size=2)
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(LongLoRAConfigError, match="unknown config key 'max_step'"):
        cc.validate_config_in_worker(cfg, world_size=2)
    checked = cc.validate_config_in_worker(_cfg(assets, tmp_path / "o"), world_size=2)
    assert checked.gradient_accumulation_steps == 2


# ------------------------------------------------------------------ pre-flight in the `tune run` launcher


def _launcher_args(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "tiny_demo",
        f"checkpoint_dir={assets['base']}",
        f"dataset.data_files={assets['corpus']}",
        f"dataset.cache_dir={assets['cache']}",
        f"output_dir={out}",
        *extra,
    ]


def test_torchrun_world_size():
    from longlora_tune.config.preflight import torchrun_world_size

    assert torchrun_world_size("2", "1") == 2
    assert torchrun_world_size(8, "2") == 16
    assert torchrun_world_size("2", "1:2") is None  # elastic: not known before launch
    assert torchrun_world_size("lots", "1") is None  # torchrun reports that itself


def test_preflight_parses_the_config_as_the_workers_do(assets, tmp_path, monkeypatch):
    from longlora_tune.config.loading import load_config
    from longlora_tune.config.preflight import preflight

    argv = ["tune", "run"]
    monkeypatch.setattr("sys.argv", argv)
    args = [
        "--config",
        str(TINY),
        "max_steps=3",
        "~keep_last_n",
        "model=longlora_tune.models.longlora_llama2_7b",
    ]
    cfg = load_config(args)
    assert cfg.max_steps == 3 and "keep_last_n" not in cfg
    assert cfg.model._component_ == "longlora_tune.models.longlora_llama2_7b"  # torchtune's section=path form
    assert __import__("sys").argv is argv
    with pytest.raises(LongLoRAConfigError, match="cannot read the config .*key=value, got max_steps"):
        load_config(["--config", str(TINY), "max_steps"])
    with pytest.raises(LongLoRAConfigError, match="config file not found: .*nope.yaml"):
        load_config(["--config", str(tmp_path / "nope.yaml")])

    # The recipe's --config is already a path when tune run hands it over.
    good = ["--config", str(TINY), *_launcher_args(assets, tmp_path / "o")[2:]]
    assert preflight("longlora_distributed", good, world_size=2) is True
    with pytest.raises(
        LongLoRAConfigError, match="global_batch_size=4 is not divisible by batch_size=1 x world"
    ):
        preflight("longlora_distributed", good, world_size=3)
    assert preflight("longlora_distributed", [*good, "max_step=3"], world_size=None) is False
    assert preflight("longlora_eval_passkey", [*good, "max_step=3"], world_size=2) is False


@pytest.mark.filterwarnings(
    "ignore:Unable to enable fault handler"
)  # torchrun's @record under pytest capture
def test_tune_run_launcher_checks_our_recipes_before_torchrun(assets, tmp_path, monkeypatch, capsys):
    import argparse

    import torchtune
    from torchtune._cli import run as tune_run

    from longlora_tune.config import tune_registry as _tune_registry

    assert _tune_registry.install_preflight() is True
    assert _tune_registry.install_preflight() is True  # idempotent: wrapped once
    assert getattr(tune_run.Run._run_distributed, "_longlora_preflight", False)
    launched = []
    monkeypatch.setattr(tune_run, "run", launched.append)  # what _run_distributed calls to start torchrun
    runner = tune_run.Run(argparse.ArgumentParser().add_subparsers())
    ours = str(resources.recipe_path("longlora_distributed"))
    recipe_args = ["--config", str(TINY), *_launcher_args(assets, tmp_path / "o")[2:]]

    def launch(recipe: str, *extra: str, is_builtin: bool = True) -> None:
        args = argparse.Namespace(
            recipe=recipe,
            recipe_args=[*recipe_args, *extra],
            nproc_per_node="2",
            nnodes="1",
            rdzv_endpoint="",
        )
        runner._run_distributed(args, is_builtin=is_builtin)

    with pytest.raises(SystemExit) as e:
        launch(ours, "max_step=3")
    assert e.value.code == 2 and not launched
    assert (
        capsys.readouterr().err
        == "longlora_tune: error: unknown config key 'max_step'; did you mean 'max_steps'?\n"
    )
    launch(ours)
    assert len(launched) == 1 and launched[0].nproc_per_node == "2"
    # torchtune's own recipes, and recipes given as a module path, launch unchecked.
    builtin = str(Path(torchtune.__file__).parents[1] / "recipes" / "lora_finetune_distributed.py")
    launch(builtin, "max_step=3")
    launch("longlora_tune.recipes.longlora_distributed", "max_step=3", is_builtin=False)
    assert len(launched) == 3


def _tune_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.slow
def test_tune_run_distributed_reports_a_config_error_once(assets, tmp_path):
    import subprocess

    cmd = tune_command("run", "--nproc_per_node", "2", "longlora_distributed")
    cmd += _launcher_args(assets, tmp_path / "o", "max_step=3")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_tune_env(), capture_output=True, text=True, timeout=300)
    message = "longlora_tune: error: unknown config key 'max_step'; did you mean 'max_steps'?"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[0] == message, proc.stderr[-3000:]
    assert proc.stderr.count(message) == 1 and "Traceback" not in proc.stderr
    assert "Running with torchrun" not in proc.stdout  # stopped before torchrun started any worker
    assert not (tmp_path / "o").exists()


_WORKER = """
import sys
from omegaconf import OmegaConf
from longlora_tune.config import validation as config_checks
from longlora_tune.errors import report_errors

@report_errors
def main():
    cfg = OmegaConf.load(sys.argv[1])
    cfg.merge_with_dotlist(sys.argv[2:])
    config_checks.validate_config_in_worker(cfg, 2)

main()
"""


@pytest.mark.slow
def test_torchrun_workers_print_a_config_error_once(assets, tmp_path):
    """Without the launcher pre-flight (plain torchrun), only local rank 0 prints the error."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    overrides = _launcher_args(assets, tmp_path / "o", "max_step=3")[2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(
        [*cmd, str(TINY), *overrides],
        cwd=tmp_path,
        env=_tune_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    message = "longlora_tune: error: unknown config key 'max_step'; did you mean 'max_steps'?"
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]


# ------------------------------------------------------------------------- reading the config: one line


_BAD_YAML = "output_dir: {out}\nmodel:\n  lora_attn_modules: [q_proj\nseed: 0\n"


def test_config_reading_errors_are_one_line(tmp_path):
    from longlora_tune.config.loading import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text(_BAD_YAML.format(out=tmp_path / "o"))
    with pytest.raises(LongLoRAConfigError) as e:
        load_config(["--config", str(bad)])
    assert str(e.value) == (
        f"{bad}:4:5: YAML syntax error: did not find expected ',' or ']' (while parsing a flow sequence); "
        "fix the file at that line"
    )
    with pytest.raises(LongLoRAConfigError) as e:
        load_config(["--config", str(tmp_path / "nope.yaml")])
    assert str(e.value) == (
        f"config file not found: {tmp_path / 'nope.yaml'}; give a config name that `tune ls` lists or the "
        "path of a YAML file"
    )
    with pytest.raises(LongLoRAConfigError) as e:
        load_config(["--config", str(TINY), "output_dir=${nope"])
    assert str(e.value) == (
        "cannot read the config: output_dir: no viable alternative at input '${nope'; fix that value "
        "(interpolation: ${key})"
    )
    with pytest.raises(LongLoRAConfigError) as e:
        load_config(["--config", str(TINY), "output_dir=${nope}/out"])
    assert str(e.value) == "the config does not resolve: Interpolation key 'nope' not found"
    assert not (tmp_path / "o").exists()


def test_recipe_config_reading_reports_on_local_rank_zero_only(tmp_path, monkeypatch, capsys):
    from longlora_tune.config import loading

    bad = tmp_path / "bad.yaml"
    bad.write_text(_BAD_YAML.format(out=tmp_path / "o"))
    ran = []
    main = errors.report_errors(loading.parse(ran.append))
    monkeypatch.setattr("sys.argv", ["recipe.py", "--config", str(bad)])
    monkeypatch.setattr(errors, "QUIET_RANK_GRACE_S", 0.0)
    for local_rank, printed in (("1", ""), ("0", f"longlora_tune: error: {bad}:4:5: YAML syntax error")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2 and not ran
        err = capsys.readouterr().err
        assert err.startswith(printed) and err.count("\n") == (1 if printed else 0), err
    monkeypatch.setattr("sys.argv", ["recipe.py", "--config", str(TINY), "seed=3"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code is None and ran[0].seed == 3  # recipe_main's return value is the exit code


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "nproc"),
    [("longlora_distributed", 1), ("longlora_distributed", 2), ("longlora_eval_passkey", 1)],
)
def test_tune_run_reports_a_yaml_error_in_one_line(tmp_path, recipe, nproc):
    import subprocess

    bad = tmp_path / "bad.yaml"
    bad.write_text(_BAD_YAML.format(out=tmp_path / "o"))
    dist = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = tune_command("run", *dist, recipe, "--config", str(bad))
    proc = subprocess.run(cmd, cwd=tmp_path, env=_tune_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"longlora_tune: error: {bad}:4:5: YAML syntax error: did not find expected ',' or ']' "
        "(while parsing a flow sequence); fix the file at that line"
    ]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ python -m longlora_tune.config.check


def test_config_names_resolve_as_tune_run_resolves_them(tmp_path):
    import torchtune

    from longlora_tune.config.tune_registry import config_file

    assert config_file("tiny_demo") == str(resources.config_path("tiny_demo"))
    assert config_file("eval/tiny_passkey") == str(resources.config_path("eval/tiny_passkey"))
    assert Path(config_file("llama2/7B_lora")).is_relative_to(Path(torchtune.__file__).parents[1])
    assert config_file(str(tmp_path / "mine.yaml")) == str(tmp_path / "mine.yaml")


def test_check_prints_the_derived_settings_and_writes_nothing(assets, tmp_path, capsys):
    from longlora_tune.config import check, preflight

    # One home: the check runs the function the recipe's workers and the tune run launcher run.
    assert check.validate_config is cc.validate_config is preflight.PREFLIGHT_CHECKS["longlora_distributed"]
    out, cache = tmp_path / "o", tmp_path / "cache"
    overrides = _launcher_args(assets, out, f"dataset.cache_dir={cache}")[2:]
    assert check.main(["--config", "tiny_demo", "--nproc_per_node", "2", *overrides]) == 0
    assert capsys.readouterr().out == (
        "config OK: tiny_demo: training length 256, S2 group 64, RoPE linear x4, LoRA rank 8 alpha 16, world "
        "size 2 (2 data x 1 context parallel): global batch 4 = 1 per rank x 2 x 2 accumulation steps, "
        "40 steps (assumed: --nproc_per_node 2 --nnodes 1)\n"
    )
    with pytest.raises(SystemExit) as e:
        check.main(["--config", "tiny_demo", *overrides, "max_step=3"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "longlora_tune: error: unknown config key 'max_step'; did you mean 'max_steps'?\n"
    with pytest.raises(SystemExit) as e:
        check.main(["--config", "tiny_demo", "--nnodes", "1:2", *overrides])
    assert e.value.code == 2 and "gives no fixed number of ranks" in capsys.readouterr().err
    assert not out.exists() and not cache.exists()


def test_check_runs_as_a_module(assets, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "longlora_tune.config.check", "--config", "tiny_demo"]
    cmd += _launcher_args(assets, tmp_path / "o", "model.s2_group_size=64")[2:]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_tune_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "longlora_tune: error: model.s2_group_size=64 and model.s2_group_size_ratio=0.25 are both set; "
        "set one of them (model.s2_group_size_ratio=null for a fixed group size, or model.s2_group_size=null)"
    ]


# ------------------------------------------------------------------------------------ context parallelism


def test_context_parallel_ranks_share_batches(assets, tmp_path):
    # tiny_demo: global batch 4, batch_size 1. Four processes as 2 data x 2 context ranks accumulate 2
    # micro-batches (each data replica sees 2 sequences), not 1.
    assert _steps(_cfg(assets, tmp_path / "o", context_parallel_degree=2), world_size=4) == 2
    assert _steps(_cfg(assets, tmp_path / "o", context_parallel_degree=4), world_size=4) == 4
    assert cc.data_parallel_size(_cfg(assets, tmp_path / "o"), 8) == 8  # default: off
    with pytest.raises(
        LongLoRAConfigError, match="context_parallel_degree=2 with compile=true is not supported"
    ):
        cc.data_parallel_size(_cfg(assets, tmp_path / "o", context_parallel_degree=2, compile="true"), 2)


@pytest.mark.parametrize(
    ("extra", "world_size", "message"),
    [
        ({"context_parallel_degree": 0}, 2, "context_parallel_degree=0 must be an integer >= 1 (1 = off)"),
        ({"context_parallel_degree": 1.5}, 2, "context_parallel_degree=1.5 must be an integer >= 1"),
        (
            {"context_parallel_degree": 3},
            2,
            "context_parallel_degree=3 does not divide the 2 rank(s); use a divisor of 2 or run on a "
            "multiple of 3 processes",
        ),
        (
            {"context_parallel_degree": 2, "model.use_full_attn": "true"},
            2,
            "context_parallel_degree=2 with model.use_full_attn=true is not supported",
        ),
        (
            {"context_parallel_degree": 2, "model.s2_wrap_around": "true"},
            2,
            "context_parallel_degree=2 with model.s2_wrap_around=true is not supported",
        ),
        ({"context_parallel_degre": 2}, 2, "unknown config key 'context_parallel_degre'; did you mean"),
    ],
)
def test_bad_context_parallel_settings_are_one_line(assets, tmp_path, extra, world_size, message):
    err = _error(_cfg(assets, tmp_path / "o", **extra), world_size=world_size)
    assert err.startswith(message) and "\n" not in err, err


@pytest.mark.parametrize(
    ("name", "published", "expected"),
    [
        ("llama3_8b_64k", "llama3_8b", ("linear", 8.0, None)),
        ("llama3_1_8b_256k", "llama3_1_8b", ("llama3", 16.0, 8192)),
        ("mistral_7b_64k", "mistral_7b", ("linear", 2.0, None)),
        ("qwen2_5_7b_128k", "qwen2_5_7b", ("yarn", 4.0, 32768)),
    ],
)
def test_family_configs_resolve_their_rope_over_the_published_checkpoint(name, published, expected):
    """Each family config's rope_scaling over its base's published config.json: one method, the factor."""
    from longlora_tune.models.families import family_of_builder
    from longlora_tune.models.shapes import MODEL_SHAPES
    from longlora_tune.modules.rope_config import RopeScaling, rope_for_training

    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    shape = MODEL_SHAPES[published]
    base = RopeScaling.from_hf_config(
        {
            "rope_theta": shape.rope_base,
            "max_position_embeddings": shape.max_position_embeddings,
            "rope_scaling": dict(shape.rope_scaling) if shape.rope_scaling else None,
        }
    )
    family = family_of_builder(cfg.model._component_)
    request = OmegaConf.to_container(cfg.rope_scaling)
    length = cc.training_length(cfg)
    rope = rope_for_training(base, length, request=request, default_type=family.default_rope_type)
    original = rope.original_max_position_embeddings if rope.rope_type != "linear" else None
    assert (rope.rope_type, rope.factor, original) == expected
    assert rope.context_len >= length == cfg.model.max_seq_len
    # The explicit factor is what the family default derives from the length: the config only states it.
    unpinned = {k: v for k, v in request.items() if k != "factor"}
    derived = rope_for_training(base, length, request=unpinned, default_type=family.default_rope_type)
    assert derived.factor == rope.factor


@pytest.mark.parametrize("name", ["llama3_8b_64k", "llama3_1_8b_256k", "mistral_7b_64k", "qwen2_5_7b_128k"])
def test_family_eval_configs_match_their_training_config(name):
    """Perplexity and passkey configs: the family's tokenizer files, text data, the training length."""
    import inspect

    from longlora_tune._compat import import_object
    from longlora_tune.models.families import family_of_builder

    train = OmegaConf.load(CONFIGS / f"{name}.yaml")
    family = family_of_builder(train.model._component_)
    length = cc.training_length(train)
    for kind, recipe in (("perplexity", "longlora_eval_perplexity"), ("passkey", "longlora_eval_passkey")):
        path = CONFIGS / "eval" / f"{name}_{kind}.yaml"
        text = path.read_text()
        assert text.startswith(f"# recipe: {recipe}\n") and f"--config eval/{name}_{kind}" in text
        cfg = OmegaConf.load(path)
        assert cfg.checkpoint_dir == f"{train.output_dir}/hf" and cfg.training_length is None
        # The family's tokenizer, reading the same files (under the base folder) as training does.
        assert cfg.tokenizer._component_ == family.tokenizer == train.tokenizer._component_
        for argument, file in family.tokenizer_files:
            assert str(cfg.tokenizer[argument]).endswith(f"/{file}"), (argument, cfg.tokenizer[argument])
        arguments = {k: v for k, v in OmegaConf.to_container(cfg.tokenizer).items() if k != "_component_"}
        inspect.signature(import_object(cfg.tokenizer._component_)).bind(**arguments)
        if kind == "perplexity":
            # Llama 2's uint16 .bin streams hold Llama 2 ids: every other family reads text.
            assert cfg.dataset.source != "bin"
            assert max(cfg.eval_lengths) == length and sorted(cfg.eval_lengths) == list(cfg.eval_lengths)
        else:
            assert cfg.max_length == length and length % cfg.interval == 0


# ----------------------------------------------------------------------- activation_checkpointing_layers


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"activation_checkpointing_layers": -1},
            "activation_checkpointing_layers=-1 must be all, auto or an integer >= 0",
        ),
        (
            {"activation_checkpointing_layers": "half"},
            "activation_checkpointing_layers='half' must be all, auto or",
        ),
        (
            {"activation_checkpointing_layers": 1.5},
            "activation_checkpointing_layers=1.5 must be all, auto or",
        ),
        (
            {"activation_checkpointing_layers": 1, "enable_activation_checkpointing": "false"},
            "activation_checkpointing_layers=1 needs enable_activation_checkpointing=true",
        ),
    ],
)
def test_bad_checkpoint_layer_counts_are_one_line(assets, tmp_path, extra, message):
    error = _error(_cfg(assets, tmp_path / "o", **extra))
    assert error.startswith(message) and "\n" not in error


@pytest.mark.parametrize(
    "extra",
    [
        {"activation_checkpointing_layers": "all"},
        {"activation_checkpointing_layers": 0},
        {"activation_checkpointing_layers": 2},
        {"activation_checkpointing_layers": 0, "enable_activation_checkpointing": "false"},
    ],
)
def test_checkpoint_layer_counts_are_accepted(assets, tmp_path, extra):
    # The bound by the model's layers is checked when the layers are wrapped (the model is not built here).
    assert _steps(_cfg(assets, tmp_path / "o", **extra), world_size=1) == 4


# ----------------------------------------------------------------------------------- sequence_tile_tokens


@pytest.mark.parametrize("value", ["0", "-8", "1.5", "true", "8k"])
def test_bad_sequence_tile_sizes_are_one_line(assets, tmp_path, value):
    error = _error(_cfg(assets, tmp_path / "o", sequence_tile_tokens=value))
    assert error.startswith("sequence_tile_tokens=") and "\n" not in error
    assert "must be a positive integer, auto or null (null = off)" in error
    assert "the last one shorter when it does not divide batch_size x seq_len" in error


@pytest.mark.parametrize("value", ["null", "1", "64", "100"])  # 100 divides neither the length nor the batch
def test_sequence_tile_sizes_are_accepted(assets, tmp_path, value):
    assert _steps(_cfg(assets, tmp_path / "o", sequence_tile_tokens=value), world_size=1) == 4
