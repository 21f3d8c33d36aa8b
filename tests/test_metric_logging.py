"""What a training run writes to its log file and its console (longlora_tune/training/metric_logging.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from longlora_tune.training.distributed import seed_rank
from longlora_tune.training.metric_logging import build_metric_logger, rounded_metrics


def test_logged_floats_are_rounded_and_the_loss_keeps_ten_digits():
    metrics = {
        "loss": 6.293192545572917,
        "lr": 0.0006000000000000001,
        "grad_norm": 1.4701286554336548,
        "tokens_per_second_per_gpu": 3239.5090216568174,
        "steps": 3,
        "nan": math.nan,
    }
    rounded = rounded_metrics(metrics)
    assert list(rounded) == list(metrics)
    assert {k: v for k, v in rounded.items() if k != "nan"} == {
        "loss": 6.293192546,
        "lr": 0.0006,
        "grad_norm": 1.47013,
        "tokens_per_second_per_gpu": 3239.51,
        "steps": 3,
    }
    assert math.isnan(rounded["nan"])
    # Losses are compared across runs at 1e-6 relative: ten digits stay far inside that.
    assert rounded["loss"] == pytest.approx(metrics["loss"], rel=1e-9, abs=0)


def test_disk_logs_are_named_after_the_run(tmp_path):
    run_id = "0123456789abcdef0123456789abcdef"
    default = build_metric_logger(None, tmp_path / "logs", run_id)
    default.log_dict(rounded_metrics({"loss": 1.0, "lr": 0.1 + 0.2}), step=1)
    default.close()
    assert [p.name for p in (tmp_path / "logs").iterdir()] == [f"log_{run_id}.txt"]
    assert (tmp_path / "logs" / f"log_{run_id}.txt").read_text() == "Step 1 | loss:1.0 lr:0.3 \n"

    section = {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(tmp_path / "c")}
    configured = build_metric_logger(OmegaConf.create(section), tmp_path / "unused", run_id)
    assert configured.path_to_log_file() == tmp_path / "c" / f"log_{run_id}.txt"
    configured.close()
    named = build_metric_logger(OmegaConf.create({**section, "filename": "mine.txt"}), tmp_path, run_id)
    assert named.path_to_log_file() == tmp_path / "c" / "mine.txt"  # the config's own name wins
    named.close()


def test_seeding_is_quiet(caplog):
    logger = logging.getLogger("torchtune.utils._logging")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        seed_rank(3)
        assert logger.level == logging.DEBUG  # restored
    assert "seed" not in caplog.text
    assert torch.initial_seed() == 3  # seed + rank, one process
