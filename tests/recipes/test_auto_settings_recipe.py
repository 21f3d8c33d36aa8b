"""``auto`` memory levers in the longlora_distributed recipe (tiny Llama 2, CPU, ``memory_budget_gib``).

A run with ``auto`` logs one line per choice, trains, and gives the losses of the same run with the chosen
values written in the config; a budget between the planner's peaks for N = 1 and N = 0 checkpointed layers
recomputes some layers; a budget nothing fits stops before ``output_dir`` exists.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lever_runs import TINY, assert_same_losses, make_lever_assets, run_steps
from omegaconf import OmegaConf
from recipe_runner import RecipeFailed
from test_longlora_distributed import _env, _losses, _overrides, _recipe_cmd

from longlora_tune.auto_choice import plan_arguments
from longlora_tune.config.validation import validate_config
from longlora_tune.plan import plan
from longlora_tune.plan.facts import GIB
from longlora_tune.training.auto_settings import LINEAR_CE_LOSS

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
AUTO = {
    "activation_checkpointing_layers": "auto",
    "sequence_tile_tokens": "auto",
    "enable_activation_offloading": "auto",
    "loss._component_": LINEAR_CE_LOSS,
    "loss.num_output_chunks": "auto",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_lever_assets(tmp_path_factory.mktemp("auto"))


def _peaks(assets: dict[str, Path], out: Path) -> list[float]:
    """The planner's peak (GiB) of this run for N = 0, 1, 2 checkpointed layers, untiled, 8 loss chunks."""
    cfg = OmegaConf.load(TINY)
    cfg.merge_with_dotlist(_overrides(assets, out, memory_budget_gib=64, **AUTO))
    kwargs = plan_arguments(cfg, validate_config(cfg, world_size=1))
    return [b / GIB for b in plan(**kwargs, gpu_memory_gib=64).checkpoint_layers_peak_bytes]


def test_auto_levers_train_with_the_losses_of_the_chosen_values(assets, tmp_path, caplog):
    peaks = _peaks(assets, tmp_path / "plan")
    # With the first layer or both checkpointed the peak is lower than with none.
    assert max(peaks[1], peaks[2]) < peaks[0]
    budget = (peaks[0] + max(peaks[1], peaks[2])) / 2  # N = 0 untiled does not fit, N = 1 does
    caplog.set_level("INFO")
    auto = run_steps(assets, tmp_path / "auto", steps=STEPS, memory_budget_gib=budget, **AUTO)
    assert f"GiB of {budget:g} GiB" in caplog.text and "(budget: memory_budget_gib)" in caplog.text
    for key in ("activation_checkpointing_layers", "loss.num_output_chunks", "sequence_tile_tokens"):
        assert f"auto: {key}: " in caplog.text
    assert "auto: enable_activation_offloading: false (not available on this device)" in caplog.text
    # The run's saved config holds the chosen values, not "auto"; the same run with them written out
    # trains to the same losses.
    saved = OmegaConf.load(next((tmp_path / "auto" / "checkpoints").glob("*/config.yaml")))
    chosen = {
        "activation_checkpointing_layers": saved.activation_checkpointing_layers,
        "sequence_tile_tokens": saved.sequence_tile_tokens,
        "loss.num_output_chunks": saved.loss.num_output_chunks,
        "enable_activation_offloading": saved.enable_activation_offloading,
    }
    assert "auto" not in [str(v) for v in chosen.values()]
    assert (chosen["activation_checkpointing_layers"], chosen["sequence_tile_tokens"]) != (0, None)
    layers = chosen["activation_checkpointing_layers"]
    assert f"Activation checkpointing: {2 if layers == 'all' else layers} decoder layer(s)" in caplog.text
    written = {k: ("null" if v is None else v) for k, v in chosen.items()}
    explicit = run_steps(assets, tmp_path / "explicit", steps=STEPS, **{**AUTO, **written})
    assert_same_losses(auto, explicit, steps=STEPS, rel=1e-12)


def test_a_larger_budget_recomputes_nothing(assets, tmp_path, caplog):
    caplog.set_level("INFO")
    run_steps(assets, tmp_path / "o", steps=1, memory_budget_gib=64, **AUTO)
    assert "auto: activation_checkpointing_layers: 0 (" in caplog.text
    assert "Activation checkpointing: 0 decoder layer(s)" in caplog.text


def test_a_budget_nothing_fits_stops_before_output_dir(assets, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RecipeFailed) as err:
        run_steps(assets, out, steps=1, memory_budget_gib=1.0, **AUTO)
    assert err.value.code == 2
    assert err.value.message.startswith("auto settings: nothing fits the 1.0 GiB budget (memory_budget_gib)")
    assert not out.exists()


def test_auto_on_cpu_without_a_budget_uses_the_available_host_memory(assets, tmp_path, caplog):
    caplog.set_level("INFO")
    run_steps(assets, tmp_path / "o", steps=1, **AUTO)
    assert "(budget: available host memory)" in caplog.text


@pytest.mark.slow
def test_two_ranks_choose_alike_and_log_once(assets, tmp_path):
    # 2 FSDP2 ranks: each resolves the levers after the process group exists; rank 0 logs the choice once.
    out = tmp_path / "two"
    overrides = _overrides(assets, out, max_steps=STEPS, export_formats="[]", memory_budget_gib=64, **AUTO)
    proc = subprocess.run(
        _recipe_cmd(TINY, overrides, nproc=2),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    logs = proc.stdout + proc.stderr
    assert logs.count("auto: activation_checkpointing_layers: 0 (") == 1
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
