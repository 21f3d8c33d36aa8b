"""What the LongLoRA family builders share: argument checks, the RoPE choice, the S² transform, sizes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from torchtune.modules import TransformerDecoder

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models.longlora import apply_longlora
from longlora_tune.models.shapes import _SIZE_FIELDS, MODEL_SHAPES
from longlora_tune.modules.rope_config import RopeScaling, check_rope_request, rope_for_training
from longlora_tune.modules.s2_attention import S2AttentionConfig

LORA_ATTN_MODULES_DEFAULT = ("q_proj", "k_proj", "v_proj", "output_proj")


def check_lora_attn_modules(lora_attn_modules: Sequence[str]) -> list[str]:
    """The LoRA targets as a list, or ValueError for a string, an empty list or an unknown name."""
    if isinstance(lora_attn_modules, str) or not lora_attn_modules:
        raise LongLoRAConfigError(
            f"lora_attn_modules must be a non-empty list such as {list(LORA_ATTN_MODULES_DEFAULT)}, "
            f"got {lora_attn_modules!r}"
        )
    unknown = set(lora_attn_modules) - set(LORA_ATTN_MODULES_DEFAULT)
    if unknown:
        raise LongLoRAConfigError(
            f"Unknown lora_attn_modules {sorted(unknown)}; choose from {list(LORA_ATTN_MODULES_DEFAULT)}"
        )
    return list(lora_attn_modules)


def resolve_rope(
    *,
    max_seq_len: int,
    rope_base: float,
    original_max_seq_len: int,
    checkpoint_rope_scaling: Optional[Mapping[str, Any]],
    rope_scaling: Optional[Mapping[str, Any]],
    rope_scaling_factor: Optional[float],
    default_type: str,
) -> RopeScaling:
    """The RoPE setting a builder installs, from the checkpoint's ``config.json`` facts and the request.

    ``checkpoint_rope_scaling``, ``rope_base`` and ``original_max_seq_len`` restate the checkpoint's
    ``rope_scaling``, ``rope_theta`` and ``max_position_embeddings`` (the recipe passes them from the base
    folder); ``rope_scaling`` is the request (:func:`~longlora_tune.modules.rope_config.check_rope_request`)
    and ``rope_scaling_factor`` a shorthand for its factor (the evaluation loader pins it).

    Raises:
        ValueError: for an invalid or inexpressible combination (a ``LongLoRAConfigError``).
    """
    checkpoint = RopeScaling.from_hf_config(
        {
            "rope_theta": rope_base,
            "max_position_embeddings": original_max_seq_len,
            "rope_scaling": dict(checkpoint_rope_scaling) if checkpoint_rope_scaling else None,
        }
    )
    request = check_rope_request(rope_scaling)
    if rope_scaling_factor is not None:
        if request is None:
            current = checkpoint.rope_type
            request = {"type": current if current != "default" else default_type}
        given = request.get("factor")
        if given is not None and float(given) != float(rope_scaling_factor):
            raise LongLoRAConfigError(
                f"rope_scaling_factor={rope_scaling_factor} disagrees with rope_scaling.factor={given}; "
                "set one of them"
            )
        request = check_rope_request({**request, "factor": rope_scaling_factor})
    return rope_for_training(checkpoint, max_seq_len, request=request, default_type=default_type)


def s2_config(
    *,
    s2_group_size_ratio: Optional[float],
    s2_group_size: Optional[int],
    s2_wrap_around: bool,
    s2_backend: str,
    use_full_attn: bool,
) -> S2AttentionConfig:
    """The S² settings of a builder's keyword arguments."""
    return S2AttentionConfig(
        group_size_ratio=s2_group_size_ratio,
        group_size=s2_group_size,
        wrap_around=s2_wrap_around,
        backend=s2_backend,
        use_full_attn=use_full_attn,
    )


def build_family(
    lora_builder: Callable[..., TransformerDecoder],
    *,
    default_rope_type: str,
    rope: dict[str, Any],
    s2: dict[str, Any],
    lora_attn_modules: Sequence[str],
    **torchtune_kwargs: Any,
) -> TransformerDecoder:
    """torchtune's LoRA builder for the family, then :func:`apply_longlora` with the resolved RoPE.

    The S² and RoPE settings are checked before the (possibly large) model is built.
    """
    modules = check_lora_attn_modules(lora_attn_modules)
    s2_settings = s2_config(**s2)
    setting = resolve_rope(
        max_seq_len=torchtune_kwargs["max_seq_len"], default_type=default_rope_type, **rope
    )
    model = lora_builder(lora_attn_modules=modules, **torchtune_kwargs)
    return apply_longlora(model, s2=s2_settings, rope=setting)


def sized(
    builder: Callable[..., TransformerDecoder],
    name: str,
    max_seq_len: int,
    knobs: dict[str, Any],
    *,
    takes_tie: bool,
    defaults: Optional[dict[str, Any]] = None,
) -> TransformerDecoder:
    """Build ``MODEL_SHAPES[name]`` with ``builder``: the shape and published facts fixed, RoPE defaults.

    The published ``max_position_embeddings``, ``rope_theta`` and ``rope_scaling`` are defaults the
    recipe overrides with the checkpoint's own (an Instruct variant may state a different context).
    """
    shape = MODEL_SHAPES[name]
    fixed: dict[str, Any] = {f: getattr(shape, f) for f in _SIZE_FIELDS}
    fixed["norm_eps"] = shape.norm_eps
    if takes_tie:
        fixed["tie_word_embeddings"] = shape.tie_word_embeddings
    clash = set(fixed) & set(knobs)
    if clash:
        family = builder.__name__
        raise LongLoRAConfigError(
            f"longlora_{name} fixes {sorted(clash)}; use longlora_tune.models.{family} to choose model shapes"
        )
    rope_defaults = {
        "rope_base": shape.rope_base,
        "original_max_seq_len": shape.max_position_embeddings,
        "checkpoint_rope_scaling": dict(shape.rope_scaling) if shape.rope_scaling else None,
        **(defaults or {}),
    }
    return builder(**fixed, max_seq_len=max_seq_len, **{**rope_defaults, **knobs})


__all__ = [
    "LORA_ATTN_MODULES_DEFAULT",
    "build_family",
    "check_lora_attn_modules",
    "resolve_rope",
    "s2_config",
    "sized",
]
