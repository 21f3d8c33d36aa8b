"""Context parallelism in the longlora_distributed recipe (tiny random Llama 2, CPU, gloo).

Each run here is compared with the same run in ONE process (no context parallelism): with labels shifted
before the split, global positions, the halo-exchange S² and the token-weighted loss over the whole mesh,
the per-step losses and the trained weights must be the single process's up to float summation order.

* ``cp2``: 2 processes as 1 data x 2 context ranks, continued pretraining (``tiny_demo``), 5 steps;
* ``elastic``: ``cp2``'s step-3 checkpoint resumed by one process without context parallelism;
* ``dp2cp2``: 4 processes as 2 data x 2 context ranks (gradient accumulation 2 instead of 4);
* packed SFT (``tiny_longalpaca``, document ids instead of the dense document mask) and right-padded SFT.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from recipe_runner import CONFIGS
from safetensors.torch import load_file
from test_longlora_distributed import _env, _losses, _recipe_cmd

from longlora_tune.quickstart import tiny
from longlora_tune.training.checkpointing import format as ckpt_format

REPO = Path(__file__).resolve().parents[2]
TINY = CONFIGS / "tiny_demo.yaml"
TINY_SFT = CONFIGS / "tiny_longalpaca.yaml"
STEPS = 5
REL = 1e-5


def _run(config: Path, out: Path, nproc: int, **values: object) -> dict[int, float]:
    cmd = _recipe_cmd(config, [f"{k}={v}" for k, v in {"output_dir": out, **values}.items()], nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return _losses(out)


def _assert_same_losses(got: dict[int, float], want: dict[int, float], steps: list[int]) -> None:
    assert sorted(got) == steps, got
    for step in steps:
        assert math.isfinite(got[step])
        assert got[step] == pytest.approx(want[step], rel=REL, abs=0), (step, got[step], want[step])


def _max_relative_difference(a_dir: Path, b_dir: Path) -> float:
    a = load_file(a_dir / ckpt_format.TRAINABLE_FILE)
    b = load_file(b_dir / ckpt_format.TRAINABLE_FILE)
    assert sorted(a) == sorted(b) and a
    # Relative to each tensor's scale: lora_b starts at zero, so an element-wise ratio would be noise.
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cp")
    base = tiny.make_hf_checkpoint(root / "base")
    corpus = tiny.make_text_corpus(root / "corpus.jsonl", n_docs=24)
    short = tiny.make_longalpaca_json(root / "short.json", n=24, seed=1, min_sentences=2, max_sentences=6)
    mixed = tiny.make_longalpaca_json(root / "mixed.json", n=16, seed=0, min_sentences=2, max_sentences=40)
    return {"root": root, "base": base, "corpus": corpus, "short": short, "mixed": mixed}


def _pretrain(assets: dict[str, Path], **extra: object) -> dict[str, object]:
    return {
        "checkpoint_dir": assets["base"],
        "dataset.data_files": assets["corpus"],
        "dataset.cache_dir": assets["root"] / "cache",
        "max_steps": STEPS,
        "save_every_n_steps": 3,
        "keep_last_n": 2,
        "lr_scheduler.num_warmup_steps": 2,
        "export_formats": "[adapter]",
        **extra,
    }


@pytest.fixture(scope="module")
def runs(assets) -> dict[str, object]:
    root = assets["root"]
    one = _run(TINY, root / "one", 1, **_pretrain(assets))
    cp2 = _run(TINY, root / "cp2", 2, **_pretrain(assets, context_parallel_degree=2))
    elastic = _run(
        TINY,
        root / "elastic",
        1,
        **_pretrain(assets, resume_from_checkpoint=root / "cp2" / "checkpoints" / "step_000003"),
    )
    return {"one": one, "cp2": cp2, "elastic": elastic}


@pytest.mark.slow
def test_two_context_ranks_give_the_single_process_losses(runs):
    _assert_same_losses(runs["cp2"], runs["one"], list(range(1, STEPS + 1)))


@pytest.mark.slow
def test_two_context_ranks_give_the_single_process_weights(runs, assets):
    root = assets["root"]
    assert _max_relative_difference(root / "one" / "adapter", root / "cp2" / "adapter") < REL


@pytest.mark.slow
def test_context_parallel_checkpoint_resumes_without_context_parallelism(runs):
    # The checkpoint holds full tensors and a global data position, so the degree may change on resume.
    _assert_same_losses(runs["elastic"], runs["one"], [4, 5])


@pytest.mark.slow
def test_four_processes_as_two_data_by_two_context_ranks(runs, assets):
    out = assets["root"] / "dp2cp2"
    losses = _run(TINY, out, 4, **_pretrain(assets, context_parallel_degree=2, max_steps=3))
    _assert_same_losses(losses, runs["one"], [1, 2, 3])


def _sft(assets: dict[str, Path], data: str, **extra: object) -> dict[str, object]:
    return {
        "checkpoint_dir": assets["base"],
        "dataset.data_files": assets[data],
        "max_steps": 3,
        "export_formats": "[]",
        **extra,
    }


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_sft_batches_give_the_single_process_losses(assets, packed):
    # Packed: document ids (from the per-document positions) replace the dense document mask; padded:
    # right padding needs no mask (S² is causal) and batches are padded to a multiple of P * G/2.
    data = "short" if packed else "mixed"
    extra = {"dataset.packed": "true", "batch_size": 1, "global_batch_size": 2} if packed else {}
    name = "packed" if packed else "padded"
    root = assets["root"]
    one = _run(TINY_SFT, root / f"{name}_one", 1, **_sft(assets, data, **extra))
    cp2 = _run(TINY_SFT, root / f"{name}_cp2", 2, **_sft(assets, data, context_parallel_degree=2, **extra))
    _assert_same_losses(cp2, one, [1, 2, 3])


@pytest.mark.slow
def test_degree_that_does_not_divide_the_world_is_one_line(assets, tmp_path):
    cmd = _recipe_cmd(
        TINY,
        [f"{k}={v}" for k, v in {"output_dir": tmp_path / "o", **_pretrain(assets)}.items()]
        + ["context_parallel_degree=3"],
        2,
    )
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = "longlora_tune: error: context_parallel_degree=3 does not divide the 2 rank(s); use a divisor of 2"
    # Once: only local rank 0 reports a config error (the recipe's own output has no traceback).
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
    assert 'recipes/longlora_distributed.py", line' not in proc.stderr
