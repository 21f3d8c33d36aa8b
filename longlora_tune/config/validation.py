"""Every up-front validation of the training recipe, and the recipe's key schema.

These checks need neither a process group nor weights: they read the config, the file system (the base
model's ``config.json`` and which files exist, the dataset's first records), whether CUDA exists, and build
the model on the meta device (no memory, a fraction of a second at 70B) to read its S² group and RoPE
factor. So they can run before any heavy work and before ``output_dir`` is touched -- in every rank of a
run, once more in the ``tune run`` launcher before torchrun starts the workers
(:mod:`longlora_tune.config.preflight`), and on their own (``python -m longlora_tune.config.check``).
Every problem is one :class:`~longlora_tune.errors.LongLoRAConfigError` line naming the value and the fix.

Torch-free at import (the key schema and the planner's readers need no torch): the checks that build a model,
read a checkpoint or a dataset import what they use when they run.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longlora_tune._compat import flex_attention_supported, import_object
from longlora_tune.errors import LongLoRAConfigError, config_error_once_per_node
from longlora_tune.models.families import family_of_builder
from longlora_tune.modules.rope_config import check_rope_request, rope_for_training
from longlora_tune.training.auto_settings import AUTO, auto_keys, check_auto_settings, parse_checkpoint_layers

if TYPE_CHECKING:
    import torch

    from longlora_tune.hf.base import HFBaseModel
    from longlora_tune.models.longlora import LongLoRAModelInfo
    from longlora_tune.models.shapes import ModelShape

#: The export formats the recipe can write (``export_formats``).
EXPORT_FORMATS = ("hf", "peft", "adapter")

# ----------------------------------------------------------------------------------------------------------
# The key schema of longlora_distributed
# ----------------------------------------------------------------------------------------------------------

#: Every top-level key the training recipe reads (what it is, for ``--help``-like listings). A key not in
#: here is refused with a "did you mean" suggestion: a typo such as ``max_step=3`` would otherwise be
#: silently ignored and the run would train with the config's value.
RECIPE_KEYS: dict[str, str] = {
    # paths
    "checkpoint_dir": "Hugging Face base model folder (config.json, *.safetensors, tokenizer files)",
    "hf_repo_id": "Hugging Face repo id of the base model (download hints, PEFT base_model_name_or_path)",
    "output_dir": "folder for checkpoints/, hf/, peft/, adapter/, logs/ (not inside checkpoint_dir)",
    # components (built with config.instantiate; their keys are checked against the builder's signature)
    "model": "model builder (_component_) and its arguments (no _component_: checkpoint_dir's builder)",
    "tokenizer": "tokenizer builder (_component_) and its arguments (no _component_: checkpoint_dir's)",
    "dataset": "dataset builder (_component_) and its arguments",
    "optimizer": "optimizer class (_component_) and its arguments",
    "lr_scheduler": "learning-rate schedule (_component_) and its arguments, or null",
    "loss": "loss class (_component_) and its arguments",
    "metric_logger": "metric logger (_component_) and its arguments, or null (DiskLogger in output_dir/logs)",
    # model and data
    "max_seq_len": "training length the sections interpolate as ${max_seq_len} (the hf_checkpoint config)",
    "trainable_extras": "trained besides LoRA: a subset of [embed, norm]",
    "rope_scaling": "RoPE extension {type: linear|yarn|llama3, factor: f, "
    "original_max_position_embeddings: n} (factor null = from the length); null = the family's default",
    "collate_fn": "dotted path of the collate function (unpacked datasets)",
    "pad_to_multiple_of": "padded batch lengths are multiples of this (null = the S2 group size)",
    "shuffle": "reshuffle the data every epoch (true/false)",
    "seed": "seed of the LoRA initialisation, data order and RNG streams",
    "num_workers": "DataLoader worker processes",
    # batch and schedule
    "batch_size": "sequences per micro-batch on one device",
    "global_batch_size": "sequences per optimizer step over all devices",
    "gradient_accumulation_steps": "micro-batches per optimizer step (instead of global_batch_size)",
    "context_parallel_degree": "ranks sharing each sequence (S2 halo exchange); divides the world size",
    "max_steps": "optimizer steps (or null with epochs)",
    "epochs": "passes over the data (or null with max_steps)",
    "clip_grad_norm": "max gradient norm (null = no clipping)",
    # checkpoints and exports
    "save_every_n_steps": "checkpoint every N steps (0 or null = only at the end)",
    "keep_last_n": "keep the newest N checkpoints (null = all)",
    "resume_from_checkpoint": "false, true (newest checkpoint in output_dir) or a checkpoint folder",
    "export_formats": "outputs written at the end: a subset of [hf, peft, adapter]",
    # device, precision and memory
    "device": "cpu or cuda (null = cuda if available)",
    "dtype": "bf16 or fp32",
    "fp32_trainable_params": "keep fp32 master copies of the trainable tensors when dtype=bf16",
    "enable_activation_checkpointing": "recompute each decoder layer in backward",
    "activation_checkpointing_layers": "all, auto (from the memory budget) or recompute only the first N "
    "decoder layers",
    "enable_activation_offloading": "offload saved activations to CPU (CUDA only): true, false or auto",
    "sequence_tile_tokens": "run each layer's MLP over tiles of this many tokens (null = off; auto)",
    "memory_budget_gib": "GiB per device the auto settings are chosen for (null = the GPU's free memory; "
    "required on CPU)",
    "fsdp_reshard_after_forward": "FSDP2: free gathered weights after forward",
    "compile": "torch.compile each decoder layer and the loss: true, false or auto (true where it is known "
    "to work; longlora_tune.training.compile)",
    # logging
    "log_every_n_steps": "log metrics every N steps",
    "log_peak_memory_stats": "log peak GPU memory per step",
}


class ComponentSection(NamedTuple):
    """How the recipe builds one ``_component_`` section with ``config.instantiate``.

    Attributes:
        required: the config must have this section (otherwise it may be missing or null).
        positional: what the recipe passes positionally, in order; the builder's first parameters take them.
        supplied: keyword arguments the recipe passes itself (the builder may require them).
    """

    required: bool
    positional: tuple[str, ...] = ()
    supplied: tuple[str, ...] = ()


#: The recipe's ``_component_`` sections. Their keys are the builder's keyword arguments, so they are checked
#: against its signature (a builder taking ``**kwargs`` accepts any key).
COMPONENT_SECTIONS: dict[str, ComponentSection] = {
    # The checkpoint's context and RoPE factor are passed by the recipe (see _rope_override).
    "model": ComponentSection(
        True, supplied=("original_max_seq_len", "rope_scaling_factor", "checkpoint_rope_scaling")
    ),
    "tokenizer": ComponentSection(True),
    "dataset": ComponentSection(True, positional=("the tokenizer",)),
    "optimizer": ComponentSection(True, positional=("the trainable parameters",)),
    "lr_scheduler": ComponentSection(False, positional=("the optimizer",), supplied=("num_training_steps",)),
    "loss": ComponentSection(True),
    "metric_logger": ComponentSection(False),
}

#: Keys whose value must be true or false.
_BOOL_KEYS = (
    "shuffle",
    "fp32_trainable_params",
    "enable_activation_checkpointing",
    "enable_activation_offloading",
    "fsdp_reshard_after_forward",
    "compile",
    "log_peak_memory_stats",
)
#: Keys of :data:`_BOOL_KEYS` that also take ``auto`` (chosen at start-up, ``training.auto_settings``).
_AUTO_BOOL_KEYS = ("enable_activation_offloading", "compile")


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def suggest(name: str, candidates: Sequence[str]) -> Optional[str]:
    """The candidate a misspelt or abbreviated key most likely meant.

    An abbreviation made of the words' initials (``learning_rate`` -> ``lr``, ``wd`` -> ``weight_decay``)
    wins; otherwise the closest spelling by :func:`difflib.get_close_matches`.

    Args:
        name: the unknown key.
        candidates: the keys that are known there.

    Returns:
        The suggestion, or None when nothing is close.
    """
    for candidate in candidates:
        if "_" in name and _initials(name) == candidate or "_" in candidate and _initials(candidate) == name:
            return candidate
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _describe_choices(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def check_keys(cfg: DictConfig) -> None:
    """Refuse top-level keys the training recipe does not read, with a "did you mean" suggestion.

    Args:
        cfg: the recipe config.

    Raises:
        LongLoRAConfigError: naming the first unknown key (in config order).
    """
    for key in cfg.keys():
        if key in RECIPE_KEYS:
            continue
        key = str(key)
        # A component argument written at the top level (``lr=1e-4`` instead of ``optimizer.lr``).
        guess = next((f"{s}.{key}" for s in COMPONENT_SECTIONS if key in _section_arguments(cfg, s)), None)
        guess = guess or suggest(key, list(RECIPE_KEYS))
        hint = f"did you mean {guess!r}?" if guess else "remove it (the recipe does not read it)"
        raise LongLoRAConfigError(f"unknown config key {key!r}; {hint}")


def _section_arguments(cfg: DictConfig, section: str) -> tuple[str, ...]:
    """Keyword names the section's builder takes ((), when the section or its builder is unusable)."""
    node = cfg.get(section, None)
    if not isinstance(node, DictConfig) or not isinstance(node.get("_component_", None), str):
        return ()
    try:
        params = inspect.signature(import_object(node._component_, f"{section}._component_")).parameters
    except (LongLoRAConfigError, TypeError, ValueError):
        return ()
    return tuple(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_component_section(cfg: DictConfig, section: str) -> None:
    """Check a ``_component_`` section's keys against its builder's signature.

    Every key must be a keyword argument of the builder (unless it takes ``**kwargs``), none may be an
    argument the recipe passes itself, and every required argument must be set.

    Args:
        cfg: the recipe config.
        section: the section's key (one of :data:`COMPONENT_SECTIONS`).

    Raises:
        LongLoRAConfigError: for a missing or unimportable ``_component_``, an unknown key (with a
            "did you mean"), a key the recipe passes itself, or a missing required argument.
    """
    spec = COMPONENT_SECTIONS[section]
    node = cfg.get(section, None)
    if node is None:
        if spec.required:
            raise LongLoRAConfigError(f"config key {section!r} is missing")
        return
    if not isinstance(node, DictConfig) or "_component_" not in node:
        raise LongLoRAConfigError(
            f"{section} must be a section with a _component_ (e.g. {section}._component_=package.builder)"
        )
    target_name = node._component_
    target = import_object(target_name, f"{section}._component_")
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return  # no signature to check against (some C builtins)
    taken = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = taken[: len(spec.positional)]
    by_name = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
    for key in (str(k) for k in node.keys() if k != "_component_"):
        if key in taken:
            what = spec.positional[taken.index(key)]
            raise LongLoRAConfigError(
                f"{section}.{key} is passed by the recipe ({what}); remove it from the config"
            )
        if key not in by_name and not open_kwargs:
            names = [n for n in by_name if n not in taken]
            guess = suggest(key, names)
            hint = f"did you mean {guess!r}?" if guess else f"its arguments are: {_describe_choices(names)}"
            raise LongLoRAConfigError(f"{section}.{key} is not an argument of {target_name}; {hint}")
    for name, p in by_name.items():
        if p.default is p.empty and name not in taken and name not in spec.supplied and name not in node:
            raise LongLoRAConfigError(f"{section}.{name} is required by {target_name}; set it in the config")


# ----------------------------------------------------------------------------------------------------------
# Values: types and ranges
# ----------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value_error(key: str, value: Any, kind: str, nullable: bool, fix: str) -> NoReturn:
    fix = f" ({fix})" if fix else ""
    raise LongLoRAConfigError(f"{key}={value!r} must be {kind}{' or null' if nullable else ''}{fix}")


def _check_int(
    node: DictConfig, key: str, minimum: int, *, prefix: str = "", nullable: bool, fix: str = ""
) -> None:
    """``node[key]`` (when present) is an int >= minimum, or null when ``nullable``."""
    if key not in node:
        return
    value = node.get(key)
    if value is None and nullable:
        return
    if not _is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        _value_error(f"{prefix}{key}", value, kind, nullable, fix)


def _check_number(
    node: DictConfig, key: str, *, prefix: str = "", positive: bool, nullable: bool, fix: str = ""
) -> None:
    """``node[key]`` (when present) is a finite number > 0 (``positive``) or >= 0, or null if ``nullable``."""
    if key not in node:
        return
    value = node.get(key)
    if value is None and nullable:
        return
    if not _is_number(value) or value < 0 or (positive and value == 0):
        _value_error(
            f"{prefix}{key}", value, "a positive number" if positive else "a number >= 0", nullable, fix
        )


def _check_dotted_path(node: DictConfig, key: str) -> None:
    if key in node:
        import_object(node.get(key), key)


def _check_checkpoint_layers(cfg: DictConfig) -> None:
    """``activation_checkpointing_layers`` parses, and is not a count with checkpointing off.

    The bound by the model's layer count is checked when the layers are wrapped
    (``longlora_tune.training.activation_checkpointing.checkpoint_layer_count``), once the model is built.
    """
    value = parse_checkpoint_layers(cfg.get("activation_checkpointing_layers", "all"))
    if _is_int(value) and value > 0 and cfg.get("enable_activation_checkpointing", True) is False:
        raise LongLoRAConfigError(
            f"activation_checkpointing_layers={value} needs enable_activation_checkpointing=true "
            "(or remove activation_checkpointing_layers)"
        )


def check_values(cfg: DictConfig, world_size: int) -> None:
    """Check the type and range of every value the recipe reads (top level and the sections' numbers).

    Args:
        cfg: the recipe config.
        world_size: number of ranks (the seed range depends on it: rank r seeds with seed + r).

    Raises:
        LongLoRAConfigError: naming the first bad value and what it must be.
    """
    for key in _BOOL_KEYS:
        if key in cfg and not isinstance(cfg.get(key), bool):
            if key in _AUTO_BOOL_KEYS and cfg.get(key) == AUTO:
                continue
            auto = ", or auto" if key in _AUTO_BOOL_KEYS else ""
            raise LongLoRAConfigError(f"{key}={cfg.get(key)!r} must be true or false{auto}")
    from longlora_tune.models.trainable import TRAINABLE_EXTRAS
    from longlora_tune.training.sequence_tiling import check_tile_tokens

    _check_checkpoint_layers(cfg)
    check_tile_tokens(cfg.get("sequence_tile_tokens", None), allow_auto=True)
    for key in ("output_dir", "checkpoint_dir"):
        if not isinstance(cfg.get(key, ""), str):
            raise LongLoRAConfigError(f"{key}={cfg.get(key)!r} must be a folder path")
    if not isinstance(cfg.get("hf_repo_id", None), (str, type(None))):
        raise LongLoRAConfigError(f"hf_repo_id={cfg.get('hf_repo_id')!r} must be a repo id such as org/name")
    if "dtype" in cfg and cfg.get("dtype") not in ("bf16", "fp32"):
        if cfg.get("dtype") == "fp16":
            raise LongLoRAConfigError("dtype=fp16 is not supported (no loss scaling); use bf16 or fp32")
        raise LongLoRAConfigError(f"dtype={cfg.get('dtype')!r} is not supported; use bf16 or fp32")
    if not isinstance(cfg.get("device", None), (str, type(None))):
        raise LongLoRAConfigError(f"device={cfg.get('device')!r} must be cpu, cuda or null")

    max_seed = 2**32 - world_size  # torchtune's set_seed: seed + rank must fit in uint32
    seed = cfg.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed <= max_seed:
        raise LongLoRAConfigError(f"seed={seed!r} must be an integer in [0, {max_seed}]")
    _check_int(cfg, "num_workers", 0, nullable=False)
    _check_int(cfg, "max_seq_len", 1, nullable=False)
    _check_number(cfg, "clip_grad_norm", positive=True, nullable=True, fix="null = no clipping")
    _check_int(cfg, "save_every_n_steps", 0, nullable=True, fix="0 or null = only at the end")
    _check_int(cfg, "keep_last_n", 1, nullable=True, fix="null = keep all")
    _check_int(cfg, "log_every_n_steps", 1, nullable=False)

    resume = cfg.get("resume_from_checkpoint", False)
    if not isinstance(resume, (bool, str, type(None))):
        raise LongLoRAConfigError(
            f"resume_from_checkpoint={resume!r} must be false, true or the path of a checkpoint folder"
        )
    extras = cfg.get("trainable_extras", TRAINABLE_EXTRAS)
    if not isinstance(extras, (ListConfig, list, tuple)) or any(e not in TRAINABLE_EXTRAS for e in extras):
        raise LongLoRAConfigError(
            f"trainable_extras={extras!r} must be a subset of {list(TRAINABLE_EXTRAS)} ([] = LoRA only)"
        )
    formats = cfg.get("export_formats", EXPORT_FORMATS)
    if not isinstance(formats, (ListConfig, list, tuple)):
        raise LongLoRAConfigError(
            f"export_formats={formats!r} must be a list such as {list(EXPORT_FORMATS)} ([] = no export)"
        )
    if cfg.get("dataset", None) is not None and not cfg.dataset.get("packed", False):
        _check_dotted_path(cfg, "collate_fn")

    # Lengths the recipe reads itself (training_length and the RoPE override).
    for section, key in (
        ("model", "max_seq_len"),
        ("model", "original_max_seq_len"),
        ("tokenizer", "max_seq_len"),
        ("dataset", "block_size"),
        ("dataset", "max_seq_len"),
    ):
        _check_int(cfg[section], key, 1, prefix=f"{section}.", nullable=section != "model")
    for key in ("packed",):
        if key in cfg.dataset and not isinstance(cfg.dataset.get(key), bool):
            raise LongLoRAConfigError(f"dataset.{key}={cfg.dataset.get(key)!r} must be true or false")
    _check_int(cfg.dataset, "num_proc", 1, prefix="dataset.", nullable=True)
    if cfg.loss.get("num_output_chunks", None) != AUTO:
        _check_int(cfg.loss, "num_output_chunks", 1, prefix="loss.", nullable=False, fix="or auto")
    # LoRA: rank 0 would only fail when the weights load (a shape mismatch deep in FSDP2), a dropout
    # outside [0, 1) in torch's Dropout with the builder's argument name.
    _check_int(cfg.model, "lora_rank", 1, prefix="model.", nullable=False, fix="LoRA rank, 8 in LongLoRA")
    _check_number(cfg.model, "lora_alpha", prefix="model.", positive=True, nullable=False, fix="e.g. 16")
    dropout = cfg.model.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise LongLoRAConfigError(
            f"model.lora_dropout={dropout!r} must be a number in [0, 1) (0 = no dropout)"
        )

    opt = cfg.optimizer
    _check_number(opt, "lr", prefix="optimizer.", positive=True, nullable=False)
    _check_number(opt, "weight_decay", prefix="optimizer.", positive=False, nullable=False)
    _check_number(opt, "eps", prefix="optimizer.", positive=True, nullable=False)
    if "betas" in opt:
        betas = opt.get("betas")
        if (
            not isinstance(betas, (ListConfig, list, tuple))
            or len(betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise LongLoRAConfigError(
                f"optimizer.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]"
            )
    if cfg.get("lr_scheduler", None) is not None:
        _check_int(cfg.lr_scheduler, "num_warmup_steps", 0, prefix="lr_scheduler.", nullable=False)


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """Check ``context_parallel_degree`` and return the data-parallel size ``world_size / degree``.

    The ranks of one context-parallel group share every sequence (each holds a contiguous slice), so the
    batch settings and the sampler count data-parallel ranks, not processes.

    Args:
        cfg: the recipe config.
        world_size: number of ranks.

    Returns:
        The number of data-parallel ranks.

    Raises:
        LongLoRAConfigError: if the degree is not a positive integer dividing ``world_size``, or is combined
            with full attention or wrap-around S² (neither splits at slice boundaries) or compile.
    """
    degree = cfg.get("context_parallel_degree", 1)
    if not _is_int(degree) or degree < 1:
        raise LongLoRAConfigError(f"context_parallel_degree={degree!r} must be an integer >= 1 (1 = off)")
    if world_size % degree:
        raise LongLoRAConfigError(
            f"context_parallel_degree={degree} does not divide the {world_size} rank(s); use a divisor of "
            f"{world_size} or run on a multiple of {degree} processes"
        )
    model = cfg.get("model", None) or {}
    if degree > 1 and model.get("use_full_attn", False):
        raise LongLoRAConfigError(
            f"context_parallel_degree={degree} with model.use_full_attn=true is not supported (full "
            "attention would need ring attention); set context_parallel_degree=1 or use_full_attn=false"
        )
    if degree > 1 and cfg.get("compile", False) is True:
        # The halo exchange (point-to-point messages inside an autograd.Function) is not traced; `auto`
        # resolves to false there (training.compile.compile_choice).
        raise LongLoRAConfigError(
            f"context_parallel_degree={degree} with compile=true is not supported; set compile=false"
        )
    if degree > 1 and model.get("s2_wrap_around", False):
        raise LongLoRAConfigError(
            f"context_parallel_degree={degree} with model.s2_wrap_around=true is not supported (the wrap "
            "links the last rank to the first); set model.s2_wrap_around=false"
        )
    return world_size // degree


def batch_settings(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """The global batch and the gradient accumulation steps the config asks for on ``world_size`` ranks.

    ``global_batch_size`` (sequences per optimizer step over all ranks; it stays the same when the number of
    GPUs changes) or torchtune's ``gradient_accumulation_steps`` (then the global batch is
    ``batch_size x world_size x gradient_accumulation_steps``). Both may be set when they agree.

    Args:
        cfg: the recipe config.
        world_size: number of ranks.

    Returns:
        ``(global_batch_size, gradient_accumulation_steps)``.

    Raises:
        LongLoRAConfigError: if a value is not a positive integer, neither is set, the global batch does
            not divide into ``batch_size x world_size``, or both are set and disagree.
    """
    if cfg.get("batch_size", None) is None:
        raise LongLoRAConfigError("config key 'batch_size' is missing")
    batch_size = cfg.batch_size
    global_batch = cfg.get("global_batch_size", None)
    accum = cfg.get("gradient_accumulation_steps", None)
    for name, value in (("batch_size", batch_size), ("gradient_accumulation_steps", accum)):
        if value is not None and (not _is_int(value) or value < 1):
            raise LongLoRAConfigError(f"{name}={value!r} must be a positive integer")
    if global_batch is None and accum is None:
        raise LongLoRAConfigError(
            "neither global_batch_size nor gradient_accumulation_steps is set; set global_batch_size "
            "(sequences per optimizer step over all devices)"
        )
    if global_batch is None:
        return batch_size * world_size * accum, accum
    steps = gradient_accumulation_steps(global_batch, batch_size, world_size)
    if accum is not None and accum != steps:
        raise LongLoRAConfigError(
            f"gradient_accumulation_steps={accum} disagrees with global_batch_size={global_batch} = "
            f"batch_size={batch_size} x world_size={world_size} x {steps}; "
            "set one of them to null"
        )
    return global_batch, steps


def gradient_accumulation_steps(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``batch_size * world_size * steps == global_batch_size``.

    Args:
        global_batch_size: sequences per optimizer step over all ranks.
        batch_size: sequences per micro-batch on one rank.
        world_size: number of ranks.

    Returns:
        The gradient accumulation steps.

    Raises:
        LongLoRAConfigError: if the numbers are not positive or do not divide.
    """
    for name, value in (("global_batch_size", global_batch_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LongLoRAConfigError(f"{name}={value!r} must be a positive integer")
    per_step = batch_size * world_size
    if global_batch_size % per_step:
        raise LongLoRAConfigError(
            f"global_batch_size={global_batch_size} is not divisible by batch_size={batch_size} x "
            f"world_size={world_size} = {per_step}; "
            f"choose a global_batch_size that is a multiple of {per_step}"
        )
    return global_batch_size // per_step


def check_output_dir(output_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """Refuse an ``output_dir`` inside (or equal to) the base model's ``checkpoint_dir``.

    Args:
        output_dir: where the run writes.
        checkpoint_dir: the base model folder.

    Raises:
        LongLoRAConfigError: if ``output_dir`` lies inside ``checkpoint_dir``.
    """
    out = Path(output_dir).expanduser().resolve()
    ckpt = Path(checkpoint_dir).expanduser().resolve()
    if out == ckpt or ckpt in out.parents:
        raise LongLoRAConfigError(
            f"output_dir={output_dir} is inside checkpoint_dir={checkpoint_dir}; "
            "write outputs elsewhere so the base model is never overwritten"
        )


def download_repo(cfg: DictConfig) -> Optional[str]:
    """The Hugging Face repository a config's download hints name.

    ``hf_repo_id``; else the repository of the family whose builder ``model._component_`` names, when the
    family has one every config of it fits (:attr:`longlora_tune.models.families.ModelFamily.download_repo`:
    Llama 2); else None, a placeholder in the hint (never another family's model).

    Args:
        cfg: the recipe config.

    Returns:
        The repository id, or None.
    """
    if cfg.get("hf_repo_id", None):
        return str(cfg.hf_repo_id)
    model = cfg.get("model", None)
    component = model.get("_component_", None) if isinstance(model, DictConfig) else None
    family = family_of_builder(component) if isinstance(component, str) else None
    return family.download_repo if family is not None else None


def complete_from_checkpoint(cfg: DictConfig) -> None:
    """Fill in a ``model`` or ``tokenizer`` section that names no ``_component_`` from ``checkpoint_dir``.

    What the ``hf_checkpoint`` config relies on: the model builder of the checkpoint's family with its
    shapes (:meth:`~longlora_tune.hf.base.HFBaseModel.model_section`) and the tokenizer its files give
    (:meth:`~longlora_tune.hf.base.HFBaseModel.tokenizer_config`); the section's own keys are kept. The config
    is changed in place, so the run, its checkpoints and ``adapter/longlora.json`` record the builder and
    tokenizer that were used.

    Args:
        cfg: the recipe config (interpolations resolvable).

    Raises:
        LongLoRAConfigError: when ``checkpoint_dir`` is not a readable, supported checkpoint (naming the
            missing file and the download command).
    """
    from longlora_tune.hf.base import HFBaseModel

    incomplete = [
        s
        for s in ("model", "tokenizer")
        if isinstance(cfg.get(s, None), DictConfig) and "_component_" not in cfg[s]
    ]
    if not incomplete:
        return
    base = HFBaseModel.read(cfg.checkpoint_dir, repo_id=download_repo(cfg))
    sections = {s: OmegaConf.to_container(cfg[s], resolve=True) for s in incomplete}
    if "model" in sections:
        cfg.model = OmegaConf.create(base.model_section(sections["model"]))
    if "tokenizer" in sections:
        cfg.tokenizer = OmegaConf.create(base.tokenizer_config(**sections["tokenizer"]))


def check_base_files(
    checkpoint_dir: str | Path, tokenizer_path: Optional[str], repo_id: Optional[str]
) -> None:
    """Check that the base model's config, weights and tokenizer exist.

    Args:
        checkpoint_dir: the Hugging Face checkpoint folder.
        tokenizer_path: the tokenizer file from the config (``tokenizer.path``), or None.
        repo_id: Hugging Face repo id for the download hint.

    Raises:
        LongLoRAConfigError: naming the missing path and the ``tune download`` command (for the tiny demo
            configs' folders: the demo command that creates them).
    """
    from longlora_tune.hf.base import HFBaseModel, download_command
    from longlora_tune.quickstart.demo import assets_command

    demo_command = assets_command(checkpoint_dir)
    if demo_command is not None and not (Path(checkpoint_dir).expanduser() / "config.json").is_file():
        raise LongLoRAConfigError(
            f"tiny base model not found: {Path(checkpoint_dir) / 'config.json'}; create the tiny model and "
            f"data with: {demo_command}"
        )
    HFBaseModel.read(checkpoint_dir, repo_id=repo_id)
    if tokenizer_path is not None and not Path(tokenizer_path).expanduser().is_file():
        raise LongLoRAConfigError(
            f"tokenizer not found: {tokenizer_path}; download the base model with: "
            f"{download_command(repo_id, checkpoint_dir)}"
        )


def check_rope_scaling(cfg: DictConfig) -> None:
    """Check the ``rope_scaling`` key against the model builder and the base checkpoint's own RoPE.

    The request must be well formed, the builder must take it, it must not be given twice (also as
    ``model.rope_scaling``/``model.rope_scaling_factor``), over the checkpoint's own scaling it must
    give one ``config.json`` ``rope_type`` (stacking a second method is refused), and an explicit factor
    must cover the training length.

    Args:
        cfg: the recipe config (``checkpoint_dir`` already checked).

    Raises:
        LongLoRAConfigError: one line naming the problem and the fix.
    """
    from longlora_tune.hf.base import HFBaseModel

    raw = cfg.get("rope_scaling", None)
    if raw is None:
        return
    container = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw
    request = check_rope_request(container)
    twice = [k for k in ("rope_scaling", "rope_scaling_factor") if cfg.model.get(k, None) is not None]
    if twice:
        raise LongLoRAConfigError(
            f"rope_scaling is set and so is model.{twice[0]}; set the RoPE extension once "
            "(top-level rope_scaling)"
        )
    if "rope_scaling" not in _section_arguments(cfg, "model"):
        raise LongLoRAConfigError(
            f"rope_scaling is set but model._component_={cfg.model.get('_component_')} does not take it; "
            "use a longlora_tune.models builder"
        )
    base = HFBaseModel.read(cfg.checkpoint_dir)
    length = training_length(cfg) or int(cfg.model.get("max_seq_len", 0) or base.original_max_seq_len)
    rope = rope_for_training(base.rope, length, request=request, default_type=base.family.default_rope_type)
    if rope.context_len < length:
        # The exported config.json would state a shorter context than the model is trained on.
        raise LongLoRAConfigError(
            f"rope_scaling.factor={request['factor']} gives a {rope.context_len}-token context, below the "
            f"training length {length}; use a larger factor or factor null"
        )


def check_training_length(
    train_len: int,
    model_max_seq_len: int,
    group_size: Optional[int],
    *,
    group_key: str = "model.s2_group_size_ratio",
) -> None:
    """Check the training sequence length against the model and the S² group size.

    Args:
        train_len: tokens per training sequence (``dataset.block_size`` or ``tokenizer.max_seq_len``).
        model_max_seq_len: the model's ``max_seq_len``.
        group_size: the S² group size, or None when training with full attention.
        group_key: the config key that set the group size, for the fix.

    Raises:
        LongLoRAConfigError: if the length exceeds the model or is not a multiple of the group size.
    """
    if train_len > model_max_seq_len:
        raise LongLoRAConfigError(
            f"training length {train_len} exceeds model.max_seq_len={model_max_seq_len}; "
            "set them to the same value"
        )
    if group_size is not None and train_len % group_size:
        raise LongLoRAConfigError(
            f"training length {train_len} is not divisible by the S2 group size {group_size}; "
            f"use a length that is a multiple of {group_size} or change {group_key}"
        )


def check_dataset_size(num_sequences: int, train_len: int, global_batch_size: int, world_size: int) -> int:
    """Check that the dataset fills at least one optimizer step; return the steps per epoch.

    Args:
        num_sequences: sequences (blocks) in the dataset.
        train_len: tokens per sequence, for the message.
        global_batch_size: sequences per optimizer step.
        world_size: ranks (the sampler drops the remainder of ``num_sequences / world_size``).

    Returns:
        Optimizer steps per pass over the data.

    Raises:
        LongLoRAConfigError: if the dataset has no full block or fewer sequences than one step needs.
    """
    if num_sequences == 0:
        raise LongLoRAConfigError(
            f"the dataset yields no full block of {train_len} tokens; add data or lower dataset.block_size"
        )
    steps = (num_sequences // world_size * world_size) // global_batch_size
    if steps == 0:
        raise LongLoRAConfigError(
            f"the dataset yields {num_sequences} blocks of {train_len} tokens but one optimizer step needs "
            f"global_batch_size={global_batch_size}; add data or lower global_batch_size"
        )
    return steps


def training_length(cfg: DictConfig) -> Optional[int]:
    """The training sequence length a config asks for.

    The first set of ``dataset.block_size`` (pretraining blocks), ``dataset.max_seq_len`` (SFT samples)
    and ``tokenizer.max_seq_len``.

    Args:
        cfg: the recipe config.

    Returns:
        The length, or None when the config sets none of them.
    """
    for section, key in (("dataset", "block_size"), ("dataset", "max_seq_len"), ("tokenizer", "max_seq_len")):
        length = cfg[section].get(key, None)
        if length is not None:
            return int(length)
    return None


def check_s2_keys(cfg: DictConfig) -> str:
    """Refuse a config that sets the S² group both ways, and name the key that sets it.

    The builders take ``s2_group_size`` over ``s2_group_size_ratio``, so a config with both would train with
    a group its ratio does not describe.

    Args:
        cfg: the recipe config.

    Returns:
        The key that sets the group size: ``model.s2_group_size`` or ``model.s2_group_size_ratio``.

    Raises:
        LongLoRAConfigError: naming both keys when both are set.
    """
    size, ratio = cfg.model.get("s2_group_size", None), cfg.model.get("s2_group_size_ratio", None)
    if size is not None and ratio is not None:
        raise LongLoRAConfigError(
            f"model.s2_group_size={size} and model.s2_group_size_ratio={ratio} are both set; set one of them "
            "(model.s2_group_size_ratio=null for a fixed group size, or model.s2_group_size=null)"
        )
    return "model.s2_group_size" if size is not None else "model.s2_group_size_ratio"


#: The builders' own names in their errors (``S2AttentionConfig``'s fields, the model length), as the
#: config spells them. Not preceded by a word character or a dot: ``model.max_seq_len`` and
#: ``s2_group_size`` are already config names.
_BUILDER_NAMES = {
    "group_size_ratio": "model.s2_group_size_ratio",
    "group_size": "model.s2_group_size",
    "max_seq_len": "model.max_seq_len",
}
_BUILDER_NAME = re.compile(r"(?<![\w.])(" + "|".join(_BUILDER_NAMES) + r")\b")


class MetaModel(NamedTuple):
    """The model a config builds, on the meta device (no memory).

    Attributes:
        model: the model (parameters on the meta device).
        info: what it is (:func:`~longlora_tune.models.longlora.describe`): S² group, RoPE, LoRA.
        rope_facts: the base checkpoint's RoPE facts the builder was given (for the exports), or {} for a
            builder that does not take them.
    """

    model: torch.nn.Module
    info: LongLoRAModelInfo
    rope_facts: dict[str, Any]


def build_meta_model(cfg: DictConfig, base: HFBaseModel, dtype: torch.dtype) -> MetaModel:
    """Build the config's model on the meta device and check it against the training length.

    The builder gets the base checkpoint's context and RoPE facts
    (:meth:`~longlora_tune.hf.base.HFBaseModel.training_overrides`). The built model's own length (a
    builder default such as ``longlora_llama2_7b``'s 8192 counts too) bounds the training length, which
    must be made of whole S² groups (and of whole half-groups per rank under context parallelism).

    Args:
        cfg: the recipe config (already checked by :func:`check_values`).
        base: the base model folder.
        dtype: the parameter dtype the run uses.

    Returns:
        The model, its description and the RoPE facts.

    Raises:
        LongLoRAConfigError: for arguments the builder refuses (named as config keys) or a training length
            that does not fit the model.
    """
    import torch
    from torchtune import config, training

    from longlora_tune.models.longlora import describe
    from longlora_tune.modules.context_parallel import check_context_parallel

    group_key = check_s2_keys(cfg)
    try:
        with training.set_default_dtype(dtype), torch.device("meta"):
            request = cfg.get("rope_scaling", None)
            overrides = base.training_overrides(
                OmegaConf.to_container(cfg.model, resolve=True),
                None if request is None else OmegaConf.to_container(request, resolve=True),
            )
            # With the checkpoint's RoPE facts, longlora.json rebuilds the model without the base config.
            rope_facts = base.builder_rope_kwargs() if "checkpoint_rope_scaling" in overrides else {}
            model = config.instantiate(cfg.model, **overrides)
    except LongLoRAConfigError as e:
        # Only the builders' argument checks become a config error line; any other exception is a bug
        # and keeps its traceback.
        message = _BUILDER_NAME.sub(lambda m: _BUILDER_NAMES[m.group(1)], str(e))
        raise LongLoRAConfigError(message if message.startswith("model.") else f"model: {message}") from e
    info = describe(model)
    train_len = training_length(cfg)
    if train_len is not None:
        max_seq_len = info.max_seq_len or int(cfg.model.get("max_seq_len", train_len))
        check_training_length(train_len, max_seq_len, info.group_size, group_key=group_key)
        degree = int(cfg.get("context_parallel_degree", 1))
        if degree > 1:
            check_context_parallel(train_len, degree, info.group_size)
    return MetaModel(model, info, rope_facts)


def check_sft_batching(cfg: DictConfig) -> None:
    """Check the batching settings of variable-length (SFT) data against the S² attention settings.

    Args:
        cfg: the recipe config.

    Raises:
        LongLoRAConfigError: for a bad ``pad_to_multiple_of``, packing with an S² backend that cannot take
            the document mask, or wrap-around S² on right-padded batches.
    """
    multiple = cfg.get("pad_to_multiple_of", None)
    if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1):
        raise LongLoRAConfigError(
            f"pad_to_multiple_of={multiple!r} must be a positive integer or null (= the S2 group size)"
        )
    model = cfg.model
    if model.get("use_full_attn", False):
        return  # torchtune's own attention takes dense and flex masks alike
    backend = model.get("s2_backend", "auto")
    if cfg.dataset.get("packed", False):
        # padded_collate_packed builds a flex BlockMask where flex attention is supported, else a dense mask.
        if backend == "flash" or (backend == "sdpa" and flex_attention_supported()):
            raise LongLoRAConfigError(
                f"dataset.packed=true needs an S2 backend that takes the document mask, not "
                f"model.s2_backend={backend}; set model.s2_backend=auto"
            )
    elif model.get("s2_wrap_around", False) and cfg.dataset.get("block_size", None) is None:
        raise LongLoRAConfigError(
            "model.s2_wrap_around=true lets the first tokens attend the padding at the end of right-padded "
            "samples; set model.s2_wrap_around=false or dataset.packed=true"
        )


def check_resolvable(cfg: DictConfig) -> None:
    """Check that every ``${...}`` interpolation resolves and no value is left as ``???``.

    Args:
        cfg: the recipe config.

    Raises:
        LongLoRAConfigError: with OmegaConf's reason.
    """
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LongLoRAConfigError(f"the config does not resolve: {reason}") from e


class CheckedConfig(NamedTuple):
    """What :func:`validate_config` derived: the settings a run on ``world_size`` ranks gets.

    Attributes:
        world_size: ranks the checks assumed.
        context_parallel_degree: ranks sharing each sequence (``world_size / degree`` data-parallel ranks).
        batch_size: sequences per micro-batch on one rank.
        global_batch_size: sequences per optimizer step over all ranks.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_steps: optimizer steps, or None when the run is set in ``epochs``.
        epochs: passes over the data, or None when the run is set in ``max_steps``.
        training_length: tokens per training sequence (None: the config sets none).
        model: the built model's S² group, RoPE setting and LoRA settings.
        shape: the built model's sizes (:func:`~longlora_tune.models.longlora.model_shape`) when a memory
            lever is ``auto`` (the planner needs them), else None.
        device: ``cpu`` or ``cuda``, the device the run trains on.
        auto: the memory levers set to ``auto`` (chosen at start-up, ``longlora_tune.auto_choice``).
    """

    world_size: int
    context_parallel_degree: int
    batch_size: int
    global_batch_size: int
    gradient_accumulation_steps: int
    max_steps: Optional[int]
    epochs: Optional[int]
    training_length: Optional[int]
    model: LongLoRAModelInfo
    shape: Optional[ModelShape] = None
    device: str = "cpu"
    auto: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: training length, S² group, RoPE, LoRA, ranks and batch, run length.

        Returns:
            E.g. ``training length 256, S2 group 64, RoPE linear x4, LoRA rank 8 alpha 16, world size 2
            (2 data x 1 context parallel): global batch 4 = 1 per rank x 2 x 2 accumulation steps, 40 steps``.
        """
        info = self.model
        group = "full attention" if info.group_size is None else f"S2 group {info.group_size}"
        lora = (
            "no LoRA" if info.lora_rank is None else f"LoRA rank {info.lora_rank} alpha {info.lora_alpha:g}"
        )
        data = self.world_size // self.context_parallel_degree
        length = "not set" if self.training_length is None else str(self.training_length)
        run = f"{self.max_steps} steps" if self.max_steps is not None else f"{self.epochs} epoch(s)"
        return (
            f"training length {length}, {group}, {_rope_summary(info)}, {lora}, world size {self.world_size} "
            f"({data} data x {self.context_parallel_degree} context parallel): global batch "
            f"{self.global_batch_size} = {self.batch_size} per rank x {data} x "
            f"{self.gradient_accumulation_steps} accumulation steps, {run}"
            + (f"; chosen at start-up for the memory budget: {', '.join(self.auto)}" if self.auto else "")
        )


def _rope_summary(info: LongLoRAModelInfo) -> str:
    if info.rope is not None:
        rope = info.rope
        if rope.rope_type == "default":
            return "RoPE unscaled"
        return f"RoPE {rope.rope_type} x{rope.factor:g} (from {rope.original_max_position_embeddings} tokens)"
    if info.rope_scaling_factor == 1.0:
        return "RoPE unscaled"
    return f"RoPE linear x{info.rope_scaling_factor:g}"


def validate_config(cfg: DictConfig, world_size: int) -> CheckedConfig:
    """Every check the training recipe runs before it touches ``output_dir`` or loads weights.

    In this order: interpolations resolve; every top-level key is one the recipe reads
    (:data:`RECIPE_KEYS`); the required keys are there; a ``model`` or ``tokenizer`` section without
    ``_component_`` is filled in from ``checkpoint_dir`` (:func:`complete_from_checkpoint`, which changes
    ``cfg``); each ``_component_`` section's keys are arguments of its builder; every value has its type
    and range (:func:`check_values`); then the settings that depend on each other, the batch on
    ``world_size`` ranks, the base model's files, the device, the model built on the meta device against
    the training length (:func:`build_meta_model`), the metric logger's package and the dataset's local
    files.

    Args:
        cfg: the recipe config.
        world_size: number of ranks the run will use.

    Returns:
        The derived settings (batch, accumulation, training length, the model's S² group and RoPE).

    Raises:
        LongLoRAConfigError: on the first problem found, as one line naming the value and the fix.
    """
    import torch

    from longlora_tune.data import check_dataset_source
    from longlora_tune.hf.base import HFBaseModel
    from longlora_tune.models.longlora import model_shape
    from longlora_tune.training.distributed import resolve_dtype
    from longlora_tune.training.metric_logging import check_metric_logger

    check_resolvable(cfg)
    check_keys(cfg)
    for key in ("output_dir", "checkpoint_dir", "model", "tokenizer", "dataset", "optimizer", "loss"):
        if cfg.get(key, None) is None:
            raise LongLoRAConfigError(f"config key {key!r} is missing")
    complete_from_checkpoint(cfg)
    for section in COMPONENT_SECTIONS:
        check_component_section(cfg, section)
    check_values(cfg, world_size)
    max_steps, epochs = cfg.get("max_steps", None), cfg.get("epochs", None)
    if (max_steps is None) == (epochs is None):
        raise LongLoRAConfigError(
            f"set exactly one of max_steps and epochs (got max_steps={max_steps}, epochs={epochs}); "
            "set the other to null"
        )
    for name, value in (("max_steps", max_steps), ("epochs", epochs)):
        if value is not None and not _is_int(value):
            raise LongLoRAConfigError(f"{name}={value!r} must be a positive integer")
        if value is not None and value < 1:
            raise LongLoRAConfigError(f"{name}={value} must be >= 1")
    check_sft_batching(cfg)
    global_batch, ga = batch_settings(cfg, data_parallel_size(cfg, world_size))
    check_output_dir(cfg.output_dir, cfg.checkpoint_dir)
    if cfg.model.get("use_dora", False):
        raise LongLoRAConfigError(
            "model.use_dora=true is not supported by longlora_distributed; set it to false"
        )
    unknown = set(cfg.get("export_formats", EXPORT_FORMATS)) - set(EXPORT_FORMATS)
    if unknown:
        raise LongLoRAConfigError(
            f"export_formats has unknown entries {sorted(unknown)}; use {list(EXPORT_FORMATS)}"
        )
    repo = download_repo(cfg)
    check_base_files(cfg.checkpoint_dir, cfg.tokenizer.get("path", None), repo)
    check_rope_scaling(cfg)
    device = cfg.get("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LongLoRAConfigError("device=cuda but no CUDA device is available; set device=cpu for CPU")
    if cfg.get("enable_activation_offloading", False) is True and device != "cuda":
        raise LongLoRAConfigError(
            "enable_activation_offloading=true needs device=cuda; set it to false (or auto) on CPU"
        )
    check_auto_settings(cfg)
    if device == "cpu" and cfg.model.get("s2_backend", "auto") == "flex":
        # torch refuses FlexAttention's backward on CPU; fail here rather than at the first step.
        raise LongLoRAConfigError(
            "model.s2_backend=flex cannot train on CPU (no FlexAttention backward there); use sdpa or auto"
        )
    dtype = resolve_dtype(cfg.get("dtype", "bf16"), torch.device(device))
    built = build_meta_model(cfg, HFBaseModel.read(cfg.checkpoint_dir, repo_id=repo), dtype)
    # The planner's view of the model, read from the built modules, for the auto settings.
    auto = tuple(auto_keys(cfg))
    shape = model_shape(built.model) if auto else None
    check_metric_logger(cfg.get("metric_logger", None))
    check_dataset_source(cfg.dataset)
    return CheckedConfig(
        world_size=world_size,
        context_parallel_degree=int(cfg.get("context_parallel_degree", 1)),
        batch_size=int(cfg.batch_size),
        global_batch_size=global_batch,
        gradient_accumulation_steps=ga,
        max_steps=max_steps,
        epochs=epochs,
        training_length=training_length(cfg),
        model=built.info,
        shape=shape,
        device=device,
        auto=auto,
    )


def validate_config_in_worker(cfg: DictConfig, world_size: int) -> CheckedConfig:
    """:func:`validate_config` for a recipe process that may be one of several torchrun workers.

    Only local rank 0 reports a config error (:func:`~longlora_tune.errors.config_error_once_per_node`).

    Args:
        cfg: the recipe config.
        world_size: number of ranks the run will use.

    Returns:
        What :func:`validate_config` returns.

    Raises:
        LongLoRAConfigError: on local rank 0 (or without torchrun) on the first problem found.
    """
    return config_error_once_per_node(lambda: validate_config(cfg, world_size))
