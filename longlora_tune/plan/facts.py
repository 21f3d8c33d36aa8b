"""What the planner's terms share: byte sizes, and the settings the recipe and the builders derive.

Settings the recipe derives are derived here by the same functions (the S² group size by
:meth:`~longlora_tune.modules.s2_attention.S2AttentionConfig.resolve_group_size`, the family by the family
record), so a setting they refuse is refused here with the same message. No torch at import.
"""

from __future__ import annotations

from collections.abc import Sequence

from longlora_tune.models.shapes import MODEL_SHAPES, ModelShape

__all__ = [
    "DTYPE_BYTES",
    "FP32_BYTES",
    "GIB",
    "INT64_BYTES",
    "checkpointed_layers",
    "model_family",
    "resolve_group_size",
    "rotates_pairs",
    "tied_head_trained",
]

GIB = 1024**3
#: Bytes per element of the compute dtypes the recipe accepts.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32_BYTES = 4
INT64_BYTES = 8


def checkpointed_layers(
    num_layers: int, activation_checkpointing: bool, checkpoint_layers: int | None
) -> int:
    """How many decoder layers are checkpointed (the first N, as
    ``longlora_tune.training.activation_checkpointing``).

    Args:
        num_layers: Decoder layers of the model.
        activation_checkpointing: The recipe's ``enable_activation_checkpointing``.
        checkpoint_layers: The recipe's ``activation_checkpointing_layers`` (None = all).

    Returns:
        N in ``[0, num_layers]``: 0 without checkpointing, ``num_layers`` for "all".

    Raises:
        ValueError: For a count outside ``[0, num_layers]``, or a positive count with checkpointing off.
    """
    if checkpoint_layers is None:
        return num_layers if activation_checkpointing else 0
    if isinstance(checkpoint_layers, bool) or not isinstance(checkpoint_layers, int):
        raise ValueError(f"checkpoint_layers must be an int or None (all), got {checkpoint_layers!r}")
    if not 0 <= checkpoint_layers <= num_layers:
        raise ValueError(
            f"activation_checkpointing_layers={checkpoint_layers} must be in [0, {num_layers}] "
            f"(the model has {num_layers} decoder layers)"
        )
    if checkpoint_layers and not activation_checkpointing:
        raise ValueError(
            f"activation_checkpointing_layers={checkpoint_layers} needs activation checkpointing on"
        )
    return checkpoint_layers


def tied_head_trained(shape: ModelShape, trainable_extras: Sequence[str]) -> bool:
    """Whether the LM head gets a weight gradient: it is the token embedding and the embedding is trained.

    Args:
        shape: Model sizes.
        trainable_extras: The recipe's ``trainable_extras``.

    Returns:
        True for a tied head with ``embed`` trained.
    """
    return shape.tie_word_embeddings and "embed" in tuple(trainable_extras)


def rotates_pairs(shape: ModelShape, family: str | None) -> bool:
    """Whether the RoPE rotates interleaved pairs (torchtune's Llama/Mistral), not head halves (Qwen2).

    Args:
        shape: Model sizes.
        family: The family (None infers it, :func:`model_family`).

    Returns:
        True for interleaved pairs (no cos/sin kept per layer).
    """
    from longlora_tune.models.families import FAMILIES

    return FAMILIES[model_family(shape, family)].qk_permuted


def resolve_group_size(max_seq_len: int, group_size: int | None, group_size_ratio: float | None) -> int:
    """The S² group size the model builder would use (one rule: ``S2AttentionConfig.resolve_group_size``).

    Args:
        max_seq_len: The model's ``max_seq_len``.
        group_size: ``model.s2_group_size`` (None: from the ratio).
        group_size_ratio: ``model.s2_group_size_ratio``.

    Returns:
        The group size.

    Raises:
        ValueError: With the builder's message, e.g. for a ratio whose product with ``max_seq_len`` is not
            an even integer.
    """
    from longlora_tune.modules.s2_attention import S2AttentionConfig

    config = S2AttentionConfig(group_size_ratio=group_size_ratio, group_size=group_size)
    return config.resolve_group_size(max_seq_len)


#: The planner's families (:data:`longlora_tune.models.families.FAMILIES`) and the first name of their
#: published shapes in :data:`MODEL_SHAPES`; Llama 2's sizes are named ``7b``, ``13b``, ``70b``.
def model_family(model: str | ModelShape, family: str | None = None) -> str:
    """The family whose builder makes ``model``: given, from its :data:`MODEL_SHAPES` name, or its shape.

    A custom :class:`ModelShape` without a family is planned as the family its structure needs: Qwen2 for
    q/k/v biases, Llama 3 for tied embeddings (Llama 2 and Mistral never tie), else Llama 2 (whose
    parameters and activations are the same as an untied Llama 3's or a Mistral's of the same sizes).

    Args:
        model: A :data:`MODEL_SHAPES` name or a shape.
        family: ``llama2``, ``llama3``, ``mistral`` or ``qwen2``; None infers it.

    Returns:
        The family name.

    Raises:
        ValueError: For an unknown family, or one whose builders cannot make the shape (biases outside
            Qwen2, tied embeddings in Llama 2 or Mistral, Qwen2 without biases).
    """
    from longlora_tune.models.families import DEFAULT_FAMILY, FAMILIES, family_of_shape

    shape = MODEL_SHAPES.get(model) if isinstance(model, str) else model
    if family is None:
        if isinstance(model, str):
            named = family_of_shape(model)
            family = named.name if named is not None else DEFAULT_FAMILY
        elif shape is not None and shape.qkv_bias:
            family = "qwen2"
        else:
            family = "llama3" if shape is not None and shape.tie_word_embeddings else DEFAULT_FAMILY
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    if isinstance(shape, ModelShape):
        spec = FAMILIES[family]
        if shape.qkv_bias != spec.qkv_bias:
            has = "has" if shape.qkv_bias else "has no"
            raise ValueError(f"the shape {has} q/k/v biases and longlora_{family} cannot build it")
        if shape.tie_word_embeddings and not spec.ties:
            raise ValueError(f"the shape ties its embeddings and longlora_{family} cannot build it")
    return family
