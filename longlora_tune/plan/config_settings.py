"""Planner arguments from a recipe config: the keys the recipe reads, read the way it reads them.

The training length is the recipe's own rule (:func:`longlora_tune.config.validation.training_length`) and a
model section without ``_component_`` takes the builder and sizes of ``checkpoint_dir``
(:meth:`longlora_tune.hf.base.HFBaseModel.model_section`), as in the recipe. Both import torch, so they are
imported when a config is read, not when the planner is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from longlora_tune.models.shapes import _SIZE_FIELDS, MODEL_SHAPES, FamilyShape, ModelShape
from longlora_tune.plan.facts import DTYPE_BYTES
from longlora_tune.training.auto_settings import ALL_LAYERS, AUTO, parse_checkpoint_layers

__all__ = ["config_auto_keys", "load_config_settings", "run_settings"]


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    from longlora_tune import resources

    shipped = resources.configs_dir()
    candidate = shipped / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped.is_dir() else []
    raise ValueError(f"Config {name!r} not found: pass a YAML path or one of {available}")


def load_config_settings(name: str) -> dict[str, Any]:
    """Planner arguments read from a shipped config name or a YAML file.

    Reads ``model`` (a sized builder such as ``longlora_llama3_1_8b`` with ``max_seq_len``, a family's
    component builder -- ``longlora_llama2``, ``longlora_llama3``, ``longlora_mistral``, ``longlora_qwen2`` --
    with explicit sizes, or no ``_component_``: the builder and sizes of ``checkpoint_dir``), the
    training length as the recipe reads it (``dataset.block_size``, ``dataset.max_seq_len`` or
    ``tokenizer.max_seq_len``; ``model.max_seq_len`` when none is set), ``batch_size``,
    ``global_batch_size``, ``dtype``, ``fp32_trainable_params``, ``trainable_extras``,
    ``enable_activation_checkpointing``, ``activation_checkpointing_layers``, ``sequence_tile_tokens``, the
    ``loss`` (its ``num_output_chunks``, and whether it is ``ChunkedLinearCrossEntropyLoss``) and the S²
    group settings.

    Args:
        name: Config name in ``configs/`` (without ``.yaml``) or a path.

    Returns:
        Keyword arguments for :func:`plan` (``model``, ``seq_len`` and ``max_seq_len`` included).

    Raises:
        ValueError: If the config is missing or its model section cannot be read.
    """
    from omegaconf import OmegaConf  # torchtune's config library; only the CLI needs it

    from longlora_tune.config import validation as config_checks

    raw = OmegaConf.load(_config_path(name))
    cfg = OmegaConf.to_container(raw, resolve=True)
    model = cfg.get("model") or {}
    if "_component_" not in model:
        # The hf_checkpoint config: the builder and shapes are the checkpoint folder's.
        folder = Path(str(cfg.get("checkpoint_dir")))
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"Config {name!r}: model has no _component_, so its builder comes from checkpoint_dir, and "
                f"{folder / 'config.json'} does not exist; set checkpoint_dir in a copy of the config"
            )
        from longlora_tune.hf.base import HFBaseModel

        model = HFBaseModel.read(folder).model_section(model)
    component = model.get("_component_", "")
    if "max_seq_len" not in model:
        raise ValueError(
            f"Config {name!r}: model.max_seq_len is missing; the planner needs the model's length"
        )
    # The recipe's rule; the recipe requires both data sections, a planner config may omit them.
    for key in ("dataset", "tokenizer"):
        if raw.get(key) is None:
            raw[key] = {}
    train_len = config_checks.training_length(raw)
    settings: dict[str, Any] = {
        "max_seq_len": int(model["max_seq_len"]),
        "seq_len": int(model["max_seq_len"]) if train_len is None else train_len,
    }
    settings["model"], settings["family"] = _config_model(name, component, model)
    if model.get("use_full_attn"):
        settings["s2"] = False
    if model.get("s2_group_size"):
        settings["group_size"] = int(model["s2_group_size"])
    elif model.get("s2_group_size_ratio"):
        settings["group_size_ratio"] = float(model["s2_group_size_ratio"])
    if "lora_rank" in model:
        settings["lora_rank"] = int(model["lora_rank"])
    if "lora_attn_modules" in model:
        settings["lora_modules"] = tuple(model["lora_attn_modules"])
    settings.update(run_settings(cfg))
    return settings


def run_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The planner arguments of a recipe config's run keys (everything but the model's sizes and length).

    Reads ``trainable_extras``, ``batch_size``, ``global_batch_size``, ``dtype``, ``fp32_trainable_params``,
    ``enable_activation_checkpointing``, ``activation_checkpointing_layers``, ``sequence_tile_tokens``,
    ``model.quantize_base``, ``enable_activation_offloading``, ``context_parallel_degree`` and the ``loss``.
    A key the config leaves out, or sets to ``auto``, is left out (the planner's default): one reader for
    the planner's CLI (:func:`load_config_settings`) and the recipe's ``auto`` settings.

    Args:
        cfg: The config, as a plain mapping or an OmegaConf ``DictConfig``.

    Returns:
        Keyword arguments for :func:`~longlora_tune.plan.plan`.

    Raises:
        LongLoRAConfigError: For an ``activation_checkpointing_layers`` value the recipe refuses.
    """
    settings: dict[str, Any] = {}
    if "trainable_extras" in cfg:
        settings["trainable_extras"] = tuple(cfg["trainable_extras"] or ())
    if "batch_size" in cfg:
        settings["batch_size"] = int(cfg["batch_size"])
    if cfg.get("global_batch_size") is not None:
        settings["global_batch_size"] = int(cfg["global_batch_size"])
    if cfg.get("dtype") in DTYPE_BYTES:
        settings["dtype"] = cfg["dtype"]
    if "fp32_trainable_params" in cfg:
        settings["fp32_trainable_params"] = bool(cfg["fp32_trainable_params"])
    if "enable_activation_checkpointing" in cfg:
        settings["activation_checkpointing"] = bool(cfg["enable_activation_checkpointing"])
    # `auto` levers keep the planner's defaults here; config_auto_keys names them for choose_settings.
    layers = parse_checkpoint_layers(cfg.get("activation_checkpointing_layers", ALL_LAYERS))
    if layers not in (None, AUTO):
        settings["checkpoint_layers"] = layers
    if cfg.get("sequence_tile_tokens") not in (None, AUTO):
        settings["sequence_tile_tokens"] = cfg["sequence_tile_tokens"]
    if (cfg.get("model") or {}).get("quantize_base"):
        settings["quantize_base"] = True
    if cfg.get("enable_activation_offloading", AUTO) != AUTO:
        settings["activation_offloading"] = bool(cfg["enable_activation_offloading"])
    if cfg.get("context_parallel_degree") is not None:
        settings["context_parallel_degree"] = int(cfg["context_parallel_degree"])
    # fsdp_cpu_offload is not read: longlora_distributed ignores the key, so the run would not offload.
    loss = cfg.get("loss") or {}
    loss_component = str(loss.get("_component_", ""))
    if "ChunkedOutput" in loss_component or "ChunkedLinearCrossEntropy" in loss_component:
        chunks = loss.get("num_output_chunks", 8)
        if chunks != AUTO:
            settings["loss_chunks"] = int(chunks)
        settings["linear_ce"] = "ChunkedLinearCrossEntropy" in loss_component
    elif loss:
        settings["loss_chunks"] = 1
    return settings


def _config_model(name: str, component: str, model: dict[str, Any]) -> tuple[str | ModelShape, str]:
    """The planned model and its family from a config's ``model`` section."""
    from longlora_tune.models.families import FAMILIES, family_of_builder, sized_shape_name

    family = family_of_builder(component)
    if family is None:
        raise ValueError(
            f"Config {name!r}: model._component_ {component!r} is not a longlora_tune.models builder "
            f"({', '.join(sorted({f.builder.rsplit('.', 1)[-1] for f in FAMILIES.values()}))} or a sized one)"
        )
    builder = component.rsplit(".", 1)[-1]
    if builder != family.builder.rsplit(".", 1)[-1]:
        key = sized_shape_name(family, builder)
        if key not in MODEL_SHAPES:
            raise ValueError(f"Config {name!r}: no published shape for model._component_ {component!r}")
        return key, family.name
    missing = [f for f in _SIZE_FIELDS[:5] if f not in model]
    intermediate = model.get("intermediate_dim")
    if intermediate is None and family.name in ("llama2", "llama3"):
        # The builders' default SwiGLU width (torchtune's scale_hidden_dim_for_mlp of each family).
        embed = int(model.get("embed_dim", 0))
        intermediate = _llama2_intermediate(embed) if family.name == "llama2" else _llama3_intermediate(embed)
    elif intermediate is None:
        missing.append("intermediate_dim")
    if missing:
        raise ValueError(f"Config {name!r}: {builder} needs model.{', model.'.join(missing)}")
    sizes = [int(model[f]) for f in _SIZE_FIELDS[:5]] + [int(intermediate)]
    tied = bool(model.get("tie_word_embeddings", False))
    if not (tied or family.qkv_bias):
        return ModelShape(*sizes), family.name
    return FamilyShape(*sizes, tie_word_embeddings=tied, qkv_bias=family.qkv_bias), family.name


def _llama3_intermediate(embed_dim: int) -> int:
    # torchtune's Llama 3 rule (used by lora_llama3_2 when intermediate_dim is None): 4 * int(2d/3) rounded
    # up to a multiple of 256. Published Llama 3 shapes state theirs (14336 for 4096).
    return 256 * ((4 * int(2 * embed_dim / 3) + 255) // 256)


def _llama2_intermediate(embed_dim: int) -> int:
    # Llama 2's SwiGLU width rule: 2/3 of 4*d rounded up to a multiple of 256 (11008 for 4096).
    hidden = int(8 * embed_dim / 3)
    return 256 * ((hidden + 255) // 256)


def config_auto_keys(name: str) -> list[str]:
    """The memory levers a config leaves to the recipe's start-up choice (``auto``).

    Args:
        name: Config name in ``configs/`` (without ``.yaml``) or a path.

    Returns:
        Their recipe keys (:data:`longlora_tune.training.auto_settings.AUTO_KEYS` order), for
        :func:`longlora_tune.plan.choose_settings` ``free``.

    Raises:
        ValueError: If the config is missing.
    """
    from omegaconf import OmegaConf

    from longlora_tune.training.auto_settings import auto_keys

    return auto_keys(OmegaConf.load(_config_path(name)))
