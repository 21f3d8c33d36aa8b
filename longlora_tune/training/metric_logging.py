"""The recipe's metric logger: torchtune's loggers, with their optional packages checked up front.

torchtune's ``TensorBoardLogger``, ``WandBLogger``, ``CometLogger`` and ``MLFlowLogger`` import their
package only when constructed, deep inside training set-up and on rank 0 only, and fail with chained
tracebacks. :func:`check_metric_logger` turns a missing package into one line with the install command
before any heavy work, on every rank.

A ``DiskLogger`` file is named after the run (``log_<run id>.txt``, the id the run's checkpoint manifests
record) instead of torchtune's Unix timestamp, and :func:`rounded_metrics` keeps float noise
(``lr:0.0006000000000000001``) out of the logged values.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from longlora_tune._compat import import_object
from longlora_tune.errors import LongLoRAConfigError

__all__ = ["LOSS_DIGITS", "METRIC_DIGITS", "build_metric_logger", "check_metric_logger", "rounded_metrics"]

#: Significant digits of a logged float metric (learning rate, gradient norm, tokens/s, memory).
METRIC_DIGITS = 6
#: Significant digits of the logged loss. Losses of two runs are compared at 1e-6 relative (resumed against
#: uninterrupted, the quick start's recorded losses); 6 digits would move a loss by up to 5e-6 relative.
LOSS_DIGITS = 10

#: Logger class name -> (module that must import, pip package).
_NEEDS = {
    "TensorBoardLogger": ("tensorboard", "tensorboard"),
    "WandBLogger": ("wandb", "wandb"),
    "CometLogger": ("comet_ml", "comet_ml"),
    "MLFlowLogger": ("mlflow", "mlflow"),
}


def check_metric_logger(section: Optional[DictConfig]) -> None:
    """Check that the configured logger's optional package is installed.

    Args:
        section: the config's ``metric_logger`` section (None = the default ``DiskLogger``).

    Raises:
        LongLoRAConfigError: naming the logger and the ``pip install`` command.
    """
    if section is None:
        return
    component = str(section.get("_component_", ""))
    name = component.rsplit(".", 1)[-1]
    if name in _NEEDS:
        module, package = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise LongLoRAConfigError(
                f"metric_logger {component} needs the {package} package: pip install {package} "
                "(or use torchtune.training.metric_logging.DiskLogger)"
            )


def rounded_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics with every float rounded for the log: :data:`LOSS_DIGITS` for ``loss``, else
    :data:`METRIC_DIGITS` significant digits; other values unchanged.

    Args:
        metrics: metric name -> value, as the recipe logs them.

    Returns:
        A new dict in the same order.
    """
    return {
        name: float(f"{value:.{LOSS_DIGITS if name == 'loss' else METRIC_DIGITS}g}")
        if isinstance(value, float)
        else value
        for name, value in metrics.items()
    }


def build_metric_logger(section: Optional[DictConfig], default_log_dir: Path, run_id: str) -> Any:
    """The configured metric logger, or a ``DiskLogger`` writing to ``default_log_dir``.

    A ``DiskLogger`` (the default, or configured without a ``filename``) writes ``log_<run_id>.txt``.

    Args:
        section: the config's ``metric_logger`` section, or None.
        default_log_dir: where the default logger writes.
        run_id: the run's id (:attr:`longlora_tune.training.checkpointing.Lineage.run_id`).

    Returns:
        A torchtune metric logger.

    Raises:
        LongLoRAConfigError: when the logger's package is missing.
    """
    from torchtune import config
    from torchtune.training.metric_logging import DiskLogger

    filename = f"log_{run_id}.txt"
    if section is None:
        return DiskLogger(log_dir=str(default_log_dir), filename=filename)
    check_metric_logger(section)
    target = import_object(section.get("_component_", None), "metric_logger._component_")
    if isinstance(target, type) and issubclass(target, DiskLogger) and not section.get("filename", None):
        return config.instantiate(section, filename=filename)
    return config.instantiate(section)
