"""The recipe's metric logger: torchtune's loggers, with their optional packages checked up front.

torchtune's ``TensorBoardLogger``, ``WandBLogger``, ``CometLogger`` and ``MLFlowLogger`` import their
package only when constructed, deep inside training set-up and on rank 0 only, and fail with chained
tracebacks. :func:`check_metric_logger` turns a missing package into one line with the install command
before any heavy work, on every rank.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from longlora_tune.errors import LongLoRAConfigError

__all__ = ["build_metric_logger", "check_metric_logger"]

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


def build_metric_logger(section: Optional[DictConfig], default_log_dir: Path) -> Any:
    """The configured metric logger, or a ``DiskLogger`` writing to ``default_log_dir``.

    Args:
        section: the config's ``metric_logger`` section, or None.
        default_log_dir: where the default logger writes.

    Returns:
        A torchtune metric logger.

    Raises:
        LongLoRAConfigError: when the logger's package is missing.
    """
    from torchtune import config
    from torchtune.training.metric_logging import DiskLogger

    if section is None:
        return DiskLogger(log_dir=str(default_log_dir))
    check_metric_logger(section)
    return config.instantiate(section)
