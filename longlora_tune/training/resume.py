"""What a resumed run may change, what it may not, and how the changes take effect.

A checkpoint stores the config it was written with. On resume the current config is compared with it:

* settings that **define the run** (model shapes and LongLoRA settings, RoPE factor, S² group size, LoRA
  rank/targets, the trainable set, the dataset and its block size, the global batch, the data order) must be
  equal: otherwise the resumed run silently becomes another experiment, so a difference is a one-line error
  naming both values;
* the **training data and tokenizer** themselves (their content, not only the config naming them) must
  be those the checkpoint was trained on: its manifest records the dataset's fingerprint;
* settings that **steer the rest of the run** (learning rate and schedule, other optimizer hyperparameters,
  clipping, ``max_steps``/``epochs``, logging and checkpoint cadence, exports, memory settings) may change
  (lowering the learning rate after a divergence is the usual reason) and take effect; each change is logged.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.training.checkpointing.format import DATASET_FINGERPRINT_KEY, MANIFEST_FILE

__all__ = [
    "RUN_DEFINING",
    "apply_optimizer_settings",
    "compare_dataset_fingerprint",
    "compare_with_checkpoint",
]

log = logging.getLogger(__name__)

#: Config keys (dotted; a section name covers all its keys) that define a run.
RUN_DEFINING = (
    "model",
    "trainable_extras",
    "dataset",
    "tokenizer.max_seq_len",
    "global_batch_size",
    "seed",
    "shuffle",
    "collate_fn",
    "pad_to_multiple_of",
)
#: Keys under those sections that do not change what is trained (kernel choice, caches).
_NOT_DEFINING = ("model.s2_backend", "dataset.cache_dir")


def _flatten(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def compare_with_checkpoint(
    current: DictConfig | Mapping[str, Any], saved: DictConfig | Mapping[str, Any], checkpoint: str
) -> list[str]:
    """Compare a resumed run's config with the one its checkpoint was written with.

    Args:
        current: this run's config.
        saved: the checkpoint's ``config.yaml``.
        checkpoint: the checkpoint folder, for messages.

    Returns:
        One ``key: old -> new`` line per setting that changed and may change (for the log).

    Raises:
        LongLoRAConfigError: for the first run-defining setting that differs, naming both values.
    """
    now = dict(_flatten(_plain(current), ""))
    then = dict(_flatten(_plain(saved), ""))
    changed = []
    for key in sorted(set(now) | set(then)):
        old, new = then.get(key), now.get(key)
        if old == new or key in ("resume_from_checkpoint", "output_dir", "checkpoint_dir"):
            continue
        defining = any(key == k or key.startswith(f"{k}.") for k in RUN_DEFINING)
        if defining and not any(key == k or key.startswith(f"{k}.") for k in _NOT_DEFINING):
            raise LongLoRAConfigError(
                f"{key}={new!r} but {checkpoint} was trained with {key}={old!r}; it defines the run, so "
                f"resume with {key}={old!r} or start a new run in another output_dir"
            )
        changed.append(f"{key}: {old!r} -> {new!r}")
    return changed


def compare_dataset_fingerprint(
    manifest: Optional[Mapping[str, Any]], current: Optional[str], checkpoint: str
) -> None:
    """Refuse to resume on training data or a tokenizer other than the checkpoint's.

    The same config can name changed data (documents dropped or edited in place, another tokenizer file at
    the same path): the resumed run would continue at a data position of other data, silently. The
    fingerprint (:func:`longlora_tune.data.dataset_fingerprint`: content hash of the data files and the
    tokenizer, block size, ...) is compared instead of the config.

    Args:
        manifest: the checkpoint's manifest (None: a checkpoint written before manifests existed).
        current: this run's dataset fingerprint (None: the dataset has none, nothing to compare).
        checkpoint: the checkpoint folder, for messages.

    Raises:
        LongLoRAConfigError: when both fingerprints are known and differ.
    """
    if manifest is None or DATASET_FINGERPRINT_KEY not in manifest:
        log.warning(
            f"{checkpoint} was written before checkpoints recorded the dataset's fingerprint, so the "
            "training data and tokenizer are not compared with the ones it was trained on"
        )
        return
    saved = manifest[DATASET_FINGERPRINT_KEY]
    if saved is None or current is None or saved == current:
        return
    raise LongLoRAConfigError(
        f"the training data or tokenizer differ from those {checkpoint} was trained on "
        f"({DATASET_FINGERPRINT_KEY} {saved[:12]}... in its {MANIFEST_FILE}, {current[:12]}... now); restore "
        "the data files and tokenizer of that run to resume it, or start a new run in another output_dir"
    )


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
    optimizer_cfg: DictConfig | Mapping[str, Any],
) -> None:
    """Make the config's optimizer hyperparameters win over the ones restored from a checkpoint.

    ``load_state_dict`` restores every param group's ``lr``, ``betas``, ``weight_decay`` ... and the
    scheduler's ``base_lrs``, so without this a changed ``optimizer.lr`` would be ignored. The schedule's
    position is kept: the new rate is the schedule's factor at the current step times the new base rate.

    Args:
        optimizer: the optimizer after its state was loaded.
        scheduler: its LR scheduler after its state was loaded, or None.
        optimizer_cfg: the config's ``optimizer`` section.
    """
    settings = {k: v for k, v in _plain(optimizer_cfg).items() if k != "_component_"}
    lr = settings.pop("lr", None)
    for group in optimizer.param_groups:
        for key, value in settings.items():
            if key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
        if lr is not None:
            group["initial_lr"] = float(lr)
            group["lr"] = float(lr)
    if lr is None:
        return
    if scheduler is not None:
        scheduler.base_lrs = [float(lr)] * len(optimizer.param_groups)
        with warnings.catch_warnings():
            # get_lr() outside step() warns; here it is exactly the closed form wanted at this step.
            warnings.simplefilter("ignore")
            rates = scheduler.get_lr()
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = float(rate)
