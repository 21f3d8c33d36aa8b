"""``auto`` memory levers: the one parser of ``activation_checkpointing_layers``, the up-front checks, and the
choice against an exhaustive search over the planner.

The recipe runs with ``auto`` are in ``tests/recipes/test_auto_settings_recipe.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.__main__ import _parse
from longlora_tune import resources
from longlora_tune.auto_choice import (
    choose_auto_settings,
    plan_arguments,
    resolve_auto_settings,
)
from longlora_tune.config import validation as cc
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models.longlora import model_shape
from longlora_tune.plan import choose_settings
from longlora_tune.quickstart import tiny
from longlora_tune.training.auto_settings import AUTO_KEYS, LINEAR_CE_LOSS, parse_checkpoint_layers

TINY = resources.configs_dir() / "tiny_demo.yaml"
ALL_AUTO = list(AUTO_KEYS)


# ------------------------------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("value", "parsed"), [("all", None), (None, None), ("auto", "auto"), (0, 0), (12, 12), ("7", 7)]
)
def test_checkpoint_layers_parse(value, parsed):
    assert parse_checkpoint_layers(value) == parsed


@pytest.mark.parametrize("value", [-1, 1.5, True, "half", "-2", ""])
def test_bad_checkpoint_layers_have_one_wording(value, capsys):
    with pytest.raises(LongLoRAConfigError) as err:
        parse_checkpoint_layers(value)
    message = str(err.value)
    assert message == (
        f"activation_checkpointing_layers={value!r} must be all, auto or an integer >= 0 "
        "(the first N decoder layers are recomputed)"
    )
    # The benchmark's --checkpoint-layers reports the same line.
    with pytest.raises(SystemExit):
        _parse(["--checkpoint-layers", str(value)])
    assert "must be all, auto or an integer >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------- the choice: the planner's


def _run(**overrides):
    kwargs = dict(
        model="7b",
        seq_len=102_400,
        gpus=8,
        linear_ce=True,
        loss_chunks=8,
        sequence_tile_tokens=None,
        activation_offloading=False,
        activation_checkpointing=True,
        suggest=False,
    )
    return {**kwargs, **overrides}


@pytest.mark.parametrize("budget", [300.0, 80.0, 40.0])
def test_the_choice_is_the_planners(budget):
    """The recipe asks plan.choose_settings (checked there against an exhaustive search), nothing else."""
    kwargs = _run()
    choice = choose_auto_settings(kwargs, budget_gib=budget, auto=ALL_AUTO, offloading_available=True)
    planner = choose_settings(
        "7b",
        102_400,
        budget_gib=budget,
        **{k: v for k, v in kwargs.items() if k not in ("model", "seq_len", "suggest")},
    )
    assert choice.plan.fits and choice.settings == {k: planner.settings[k] for k in ALL_AUTO}
    assert list(choice.settings) == ALL_AUTO


def test_budgets_give_different_sensible_choices():
    kwargs = _run()
    chosen = {
        b: choose_auto_settings(kwargs, budget_gib=b, auto=ALL_AUTO, offloading_available=True)
        for b in (300.0, 80.0, 40.0, 20.0, 10.0)
    }
    # Llama 2 7B at 100k on 8 GPUs: more memory, fewer recomputed layers; 40 GiB needs offloading with every
    # layer checkpointed, 20 GiB also the tiles; 10 GiB fits nothing.
    roomy, tight = (chosen[b].settings["activation_checkpointing_layers"] for b in (300.0, 80.0))
    assert 0 < roomy < tight < 32
    assert not any(chosen[b].settings["enable_activation_offloading"] for b in (300.0, 80.0))
    assert chosen[40.0].settings["enable_activation_offloading"]
    assert chosen[40.0].settings["activation_checkpointing_layers"] == "all"
    assert chosen[40.0].settings["sequence_tile_tokens"] is None
    assert chosen[20.0].settings["sequence_tile_tokens"] is not None and chosen[20.0].plan.fits
    assert not chosen[10.0].plan.fits
    flops = [chosen[b].plan.flops.total for b in (300.0, 80.0, 40.0, 20.0)]
    assert flops == sorted(flops)  # less memory, more recompute


def test_offloading_is_never_chosen_where_it_cannot_run():
    kwargs = _run()
    choice = choose_auto_settings(kwargs, budget_gib=40.0, auto=ALL_AUTO, offloading_available=False)
    assert choice.settings["enable_activation_offloading"] is False and not choice.plan.activation_offloading
    assert choice.reasons[-1] == "enable_activation_offloading: false (not available on this device)"
    off = choose_auto_settings(
        _run(activation_checkpointing=False), budget_gib=300.0, auto=ALL_AUTO, offloading_available=True
    )
    assert off.settings["activation_checkpointing_layers"] == 0
    assert off.settings["enable_activation_offloading"] is False


def test_given_values_stay_and_only_auto_keys_are_chosen():
    kwargs = _run(checkpoint_layers=32)
    choice = choose_auto_settings(
        kwargs, budget_gib=80.0, auto=["sequence_tile_tokens"], offloading_available=True
    )
    assert list(choice.settings) == ["sequence_tile_tokens"]
    assert choice.plan.checkpoint_layers == 32 and choice.plan.loss_chunks == 8


# ---------------------------------------------------------------------------- the up-front checks (config)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("auto")
    base = tiny.make_hf_checkpoint(root / "base")
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=4)
    return {"base": base, "corpus": corpus, "cache": root / "cache"}


def _cfg(assets, out: Path, **extra):
    values = {
        "checkpoint_dir": assets["base"],
        "output_dir": out,
        "dataset.data_files": assets["corpus"],
        "dataset.cache_dir": assets["cache"],
        "device": "cpu",
        **extra,
    }
    cfg = OmegaConf.load(TINY)
    cfg.merge_with_dotlist([f"{k}={v}" for k, v in values.items()])
    return cfg


AUTO_CFG = {
    "activation_checkpointing_layers": "auto",
    "sequence_tile_tokens": "auto",
    "enable_activation_offloading": "auto",
    "loss._component_": LINEAR_CE_LOSS,
    "loss.num_output_chunks": "auto",
}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"memory_budget_gib": 0},
            "memory_budget_gib=0 must be a positive number of GiB or null (null = the GPU's free memory, "
            "on CPU "
            "the host's available memory shared by its ranks)",
        ),
        ({"memory_budget_gib": "lots"}, "memory_budget_gib='lots' must be a positive number of GiB"),
        (
            {"loss.num_output_chunks": "auto", "memory_budget_gib": 8},
            f"loss.num_output_chunks=auto needs loss._component_={LINEAR_CE_LOSS}",
        ),
        (
            {"enable_activation_offloading": "maybe"},
            "enable_activation_offloading='maybe' must be true or false, or auto",
        ),
        (
            {"sequence_tile_tokens": "big"},
            "sequence_tile_tokens='big' must be a positive integer, auto or null",
        ),
    ],
)
def test_bad_auto_settings_are_one_line_errors(assets, tmp_path, extra, message):
    with pytest.raises(LongLoRAConfigError) as err:
        cc.validate_config(_cfg(assets, tmp_path / "o", **extra), world_size=1)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_auto_settings_pass_the_checks_and_carry_the_model_shape(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o", memory_budget_gib=8, **AUTO_CFG)
    checked = cc.validate_config(cfg, world_size=1)
    # The shape the planner gets is the built model's (tiny_demo's sizes).
    assert (checked.shape.num_layers, checked.shape.embed_dim, checked.shape.intermediate_dim) == (2, 64, 128)
    assert checked.shape == model_shape(cc.build_meta_model(cfg, _base(assets), torch.float32).model)
    kwargs = plan_arguments(cfg, checked)
    assert (kwargs["seq_len"], kwargs["gpus"], kwargs["group_size"], kwargs["linear_ce"]) == (
        256,
        1,
        64,
        True,
    )
    assert checked.summary().endswith(
        "40 steps; chosen at start-up for the memory budget: activation_checkpointing_layers, "
        "loss.num_output_chunks, sequence_tile_tokens, enable_activation_offloading"
    )
    # Without an auto lever the shape is not needed.
    assert cc.validate_config(_cfg(assets, tmp_path / "o"), world_size=1).shape is None


def _base(assets):
    from longlora_tune.hf.base import HFBaseModel

    return HFBaseModel.read(assets["base"])


def test_resolving_writes_numbers_into_the_config_and_logs_one_line_per_key(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o", memory_budget_gib=64, **AUTO_CFG)
    checked = cc.validate_config(cfg, world_size=1)
    lines = resolve_auto_settings(cfg, checked, torch.device("cpu"))
    assert lines[0].startswith("auto: custom at 256 tokens: peak ")
    assert lines[0].endswith("(budget: memory_budget_gib)")
    assert [line.split(":")[1].strip() for line in lines[1:]] == list(AUTO_KEYS)
    assert lines[1].startswith("auto: activation_checkpointing_layers: 0 (0 of 2 layers recomputed")
    assert lines[-1] == "auto: enable_activation_offloading: false (not available on this device)"
    assert cfg.activation_checkpointing_layers == 0 and cfg.sequence_tile_tokens is None
    # One chunk: at 256 tokens more would not lower the peak (the planner's rule: the fewest that give it).
    assert cfg.loss.num_output_chunks == 1 and cfg.enable_activation_offloading is False
    # The resolved config passes the checks as a config with those values given.
    cc.validate_config(cfg, world_size=1)


def test_a_budget_nothing_fits_is_one_line_with_the_verdict(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "o", memory_budget_gib=1.0, **AUTO_CFG)
    checked = cc.validate_config(cfg, world_size=1)
    with pytest.raises(LongLoRAConfigError) as err:
        resolve_auto_settings(cfg, checked, torch.device("cpu"))
    message = str(err.value)
    assert message.startswith(
        "auto settings: nothing fits the 1.0 GiB budget (memory_budget_gib); planner peak "
    )
    assert "even with activation_checkpointing_layers=" in message and "loss.num_output_chunks=" in message
    assert "; try " in message and "\n" not in message


# ------------------------------------------------------------------------------------------ compile: auto


def test_compile_auto_compiles_only_where_that_is_known_to_work(monkeypatch):
    from longlora_tune.training.compile import compile_choice, padded_lengths

    cpu = torch.device("cpu")
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")  # nothing to build: compilable anywhere
    on, why = compile_choice(cpu, context_parallel_degree=1, activation_offloading=False)
    assert on and why.startswith("aot_eager compiles on cpu")
    on, why = compile_choice(cpu, context_parallel_degree=2, activation_offloading=False)
    assert (on, why) == (False, "context_parallel_degree=2: the halo exchange is not traced")
    on, why = compile_choice(cpu, context_parallel_degree=1, activation_offloading=True)
    assert not on and why.startswith("activation offloading is on")
    # S² pads to whole groups: 4 lengths at G = N/4 compile; 64-token multiples of 32k would be 512.
    assert padded_lengths(None, 8192, 32768) == 4 and padded_lengths(64, 8192, 32768) == 512
    assert padded_lengths(None, None, 8192) is None
    assert compile_choice(cpu, context_parallel_degree=1, activation_offloading=False, lengths=4)[0]
    on, why = compile_choice(cpu, context_parallel_degree=1, activation_offloading=False, lengths=512)
    assert (on, why) == (
        False,
        "512 padded sequence lengths would each compile (more than 8); a larger pad_to_multiple_of "
        "gives fewer",
    )
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "inductor")
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    on, why = compile_choice(cpu, context_parallel_degree=1, activation_offloading=False)
    assert not on and "needs a C++ compiler for inductor (no C++ compiler found)" in why


def test_compile_auto_resolves_after_the_memory_levers(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")
    cfg = _cfg(assets, tmp_path / "o", memory_budget_gib=64, compile="auto", **AUTO_CFG)
    checked = cc.validate_config(cfg, world_size=1)
    lines = resolve_auto_settings(cfg, checked, torch.device("cpu"))
    assert cfg.compile is True
    assert lines[-1] == (
        "auto: compile: true (aot_eager compiles on cpu; the first step of each sequence length compiles)"
    )
    cc.validate_config(cfg, world_size=1)  # the resolved config passes the checks
    # Alone (no memory lever auto) it is still resolved, in one line.
    cfg = _cfg(assets, tmp_path / "o", compile="auto")
    assert resolve_auto_settings(cfg, cc.validate_config(cfg, world_size=1), torch.device("cpu")) == [
        "auto: compile: true (aot_eager compiles on cpu; the first step of each sequence length compiles)"
    ]


def test_compile_auto_passes_the_checks_with_context_parallelism(assets, tmp_path):
    # compile=true is refused with context parallelism; auto is accepted (it resolves to false there).
    cfg = _cfg(assets, tmp_path / "o", compile="auto", context_parallel_degree=2)
    cc.data_parallel_size(cfg, 2)
    with pytest.raises(LongLoRAConfigError, match="compile='maybe' must be true or false, or auto"):
        cc.validate_config(_cfg(assets, tmp_path / "o", compile="maybe"), world_size=1)
