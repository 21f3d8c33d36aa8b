"""The LongLoRA transform for any torchtune ``TransformerDecoder``.

LongLoRA changes two things inside every attention layer: the rotary embedding divides positions by the
interpolation factor, and the attention call uses shifted sparse attention (S²) while training. Both are
swapped in place on torchtune's ``MultiHeadAttention`` modules, so parameter names, LoRA layers,
checkpoint conversion, FSDP sharding and activation checkpointing are untouched. The transform also makes
the norms and SwiGLU MLPs keep fewer tensors for backward (:mod:`longlora_tune.modules.lean_layers`: same
forward, same parameters), because LongLoRA trains every norm and keeps a layer's activations wherever
memory allows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn
from torchtune.models.llama3_1 import Llama3ScaledRoPE
from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import MultiHeadAttention, RotaryPositionalEmbeddings, TiedLinear

from longlora_tune._compat import attention_call, set_attention_call
from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.models.shapes import FamilyShape, ModelShape
from longlora_tune.modules.lean_layers import apply_lean_layers
from longlora_tune.modules.rope_config import RopeScaling
from longlora_tune.modules.rope_scaling import SCALED_ROPE_MODULES, LinearScaledRotaryPositionalEmbeddings
from longlora_tune.modules.s2_attention import S2Attention, S2AttentionConfig

__all__ = ["LongLoRAModelInfo", "apply_longlora", "describe", "model_shape"]


def apply_longlora(
    model: nn.Module,
    *,
    s2: Optional[S2AttentionConfig],
    rope_scaling_factor: float | None = None,
    rope_base: float | None = None,
    rope: RopeScaling | None = None,
) -> nn.Module:
    """Turn a torchtune decoder into a LongLoRA model, in place.

    For every ``MultiHeadAttention``:

    * ``pos_embeddings`` (a plain :class:`~torchtune.modules.RotaryPositionalEmbeddings`) is replaced by
      :class:`LinearScaledRotaryPositionalEmbeddings` with the same ``dim``, ``max_seq_len`` and ``base``
      (or ``rope_base``) and ``rope_scaling_factor``. A RoPE module shared by several layers stays shared.
    * ``_attention_call`` becomes an :class:`S2Attention` child module wrapping the original call, with
      ``G = s2.resolve_group_size(mha.max_seq_len)``. It uses S² only in training mode. With ``s2=None``
      (evaluation and generation: always full attention) the attention call is left as it is.

    And torchtune's ``RMSNorm`` and SwiGLU ``FeedForward`` modules become their lean forms
    (:func:`~longlora_tune.modules.lean_layers.apply_lean_layers`), which keep fewer tensors for backward.

    GQA: S² splits the *query* heads in two sets, ``[0, H//2)`` unshifted and ``[H//2, H)`` shifted
    (:func:`~longlora_tune.modules.s2_heads.shifted_heads`; any count, e.g. SmolLM2's 9 heads as 4 + 5).
    torchtune's attention expands the key/value heads to one per query head before the attention call, so
    each query head is shifted together with its own copy of the keys and values; any ``num_kv_heads``
    dividing ``num_heads`` -- 1 (MQA) or an odd count such as 3, whose heads may serve query heads of both
    sets -- gives exactly the per-head S² pattern.

    Neither replacement has parameters or persistent buffers, so ``state_dict`` keys are unchanged and
    torchtune's checkpointers load and save the model as before. The new RoPE is created on the device of
    the old one, so this works on a meta-device model; call ``rope_init()`` after materialising, as
    torchtune recipes already do.

    Args:
        model: A torchtune ``TransformerDecoder`` (or any module containing ``MultiHeadAttention``).
        s2: S² settings, or None for position interpolation only.
        rope_scaling_factor: Linear position-interpolation factor (>= 1), e.g. from
            :func:`~longlora_tune.modules.position_interpolation.position_interpolation_factor`.
        rope_base: RoPE base to use instead of the original module's (torchtune's ``lora_llama2``
            builder hard-codes 10000); None keeps the original.
        rope: A full RoPE setting (linear, yarn or llama3, with its ``rope_theta`` as the base) instead of
            ``rope_scaling_factor``/``rope_base``; it may also replace torchtune's ``Llama3ScaledRoPE`` (the
            Llama 3.1+ builders' module) and ``Qwen2RotaryPositionalEmbeddings`` (keeping its half rotation).

    Returns:
        The same ``model``, modified.

    Raises:
        ValueError: If the model has no ``MultiHeadAttention``, LongLoRA was already applied, a layer's
            positional embedding is not plain RoPE, or a setting is invalid.
    """
    if s2 is not None and not isinstance(s2, S2AttentionConfig):
        raise ValueError(f"s2 must be an S2AttentionConfig or None, got {type(s2).__name__}")
    if rope_base is not None and (
        isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 0
    ):
        raise LongLoRAConfigError(f"rope_base must be a positive number or None, got {rope_base!r}")
    if rope is not None:
        if not isinstance(rope, RopeScaling) or rope_scaling_factor is not None or rope_base is not None:
            raise ValueError("pass either rope=RopeScaling(...) or rope_scaling_factor/rope_base, not both")
        replaceable: tuple[type, ...] = (
            RotaryPositionalEmbeddings,
            Llama3ScaledRoPE,
            Qwen2RotaryPositionalEmbeddings,
        )
    else:
        if rope_scaling_factor is None:
            raise ValueError("apply_longlora needs rope_scaling_factor or rope=RopeScaling(...)")
        # Validates the factor once, with a clear message, before anything is modified.
        LinearScaledRotaryPositionalEmbeddings(dim=2, max_seq_len=1, scaling_factor=rope_scaling_factor)
        replaceable = (RotaryPositionalEmbeddings,)
    attentions = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    if not attentions:
        raise ValueError(
            f"apply_longlora found no torchtune MultiHeadAttention in {type(model).__name__}; "
            "build the model with a torchtune builder such as lora_llama2"
        )

    # Check every layer before changing any, so a failure leaves the model as it was.
    group_sizes = {}
    for name, mha in attentions:
        if isinstance(attention_call(mha), S2Attention) or isinstance(
            mha.pos_embeddings, SCALED_ROPE_MODULES
        ):
            raise ValueError(f"apply_longlora was already applied to this model ({name} is converted)")
        if type(mha.pos_embeddings) not in replaceable:
            raise ValueError(
                f"{name}.pos_embeddings is {type(mha.pos_embeddings).__name__}; apply_longlora needs plain "
                "torchtune RotaryPositionalEmbeddings to add linear position interpolation"
            )
        if s2 is None:
            continue
        group_sizes[name] = s2.resolve_group_size(mha.max_seq_len)

    scaled: dict[int, RotaryPositionalEmbeddings] = {}
    for name, mha in attentions:
        old = mha.pos_embeddings
        if id(old) not in scaled:
            # torchtune's Llama3ScaledRoPE built on the meta device has no buffers at all.
            theta = getattr(old, "theta", None)
            with torch.device(theta.device if theta is not None else "meta"):
                if rope is not None:
                    half = isinstance(old, Qwen2RotaryPositionalEmbeddings)
                    scaled[id(old)] = rope.build_module(old.dim, old.max_seq_len, half_rotation=half)
                else:
                    scaled[id(old)] = LinearScaledRotaryPositionalEmbeddings(
                        dim=old.dim,
                        max_seq_len=old.max_seq_len,
                        base=old.base if rope_base is None else rope_base,
                        scaling_factor=rope_scaling_factor,  # type: ignore[arg-type]
                    )
        mha.pos_embeddings = scaled[id(old)]
        if s2 is not None:
            set_attention_call(mha, S2Attention(group_sizes[name], s2, attention_call(mha)))
    apply_lean_layers(model)
    return model


@dataclasses.dataclass(frozen=True)
class LongLoRAModelInfo:
    """What a built LongLoRA model is, read from its modules (never from the config that built it).

    Attributes:
        group_size: S² group size in tokens; None when every layer trains with full attention.
        rope_scaling_factor: linear position-interpolation factor (1.0 for plain RoPE).
        lora_rank: LoRA rank; None without LoRA layers.
        lora_alpha: LoRA alpha; None without LoRA layers.
        lora_targets: torchtune short names of the projections that carry LoRA (``q_proj``, ...).
        max_seq_len: the model's longest accepted sequence (None if the model does not say).
        rope: the full RoPE setting (method, factor, original context, theta) when the model's RoPE was
            installed from a :class:`~longlora_tune.modules.rope_config.RopeScaling` (every family builder
            except Llama 2's default linear path); None otherwise (``rope_scaling_factor`` says it all).
    """

    group_size: Optional[int]
    rope_scaling_factor: float
    lora_rank: Optional[int]
    lora_alpha: Optional[float]
    lora_targets: tuple[str, ...]
    max_seq_len: Optional[int]
    rope: Optional[RopeScaling] = None


def _one(values: set, what: str) -> object:
    if len(values) > 1:
        raise ValueError(f"the model's layers use different {what}: {sorted(values)}")
    return values.pop() if values else None


def describe(model: nn.Module) -> LongLoRAModelInfo:
    """Describe a LongLoRA model: S² group size, RoPE factor and setting, LoRA rank/alpha/targets, length.

    Args:
        model: a model built by :mod:`longlora_tune.models` (or any torchtune decoder).

    Returns:
        The description.

    Raises:
        ValueError: if layers disagree on a setting that must be uniform.
    """
    groups = {
        m.group_size for m in model.modules() if isinstance(m, S2Attention) and not m.config.use_full_attn
    }
    factors = {float(m.scaling_factor) for m in model.modules() if isinstance(m, SCALED_ROPE_MODULES)}
    lora = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "rank")]
    rank_alpha = _one({(int(m.rank), float(m.alpha)) for _, m in lora}, "LoRA (rank, alpha)")
    max_seq_len = getattr(model, "max_seq_len", None)
    settings = {
        getattr(m, "rope_scaling", None) for m in model.modules() if isinstance(m, SCALED_ROPE_MODULES)
    }
    return LongLoRAModelInfo(
        group_size=_one(groups, "S2 group sizes"),  # type: ignore[arg-type]
        rope_scaling_factor=_one(factors, "RoPE factors") or 1.0,  # type: ignore[arg-type]
        lora_rank=rank_alpha[0] if rank_alpha else None,  # type: ignore[index]
        lora_alpha=rank_alpha[1] if rank_alpha else None,  # type: ignore[index]
        lora_targets=tuple(sorted({name.rsplit(".", 1)[-1] for name, _ in lora})),
        max_seq_len=int(max_seq_len) if max_seq_len is not None else None,
        rope=None if None in settings else _one(settings, "RoPE settings"),  # type: ignore[arg-type]
    )


def model_shape(model: nn.Module) -> ModelShape:
    """The sizes of a built torchtune decoder (meta-device parameters are fine), as the planner takes them.

    Read from the modules, never from the config that built them: vocabulary and hidden size from the token
    embedding, heads from the attention modules, the SwiGLU width from the first layer's ``w1``, the head
    tied to the embedding (torchtune's ``TiedLinear``) and q/k/v biases.

    Args:
        model: A torchtune ``TransformerDecoder`` (LoRA, QLoRA and LongLoRA transforms included).

    Returns:
        The shape: a :class:`~longlora_tune.models.shapes.FamilyShape` when the head is tied or q/k/v have
        biases (its RoPE and norm fields stay at their defaults: memory and FLOPs do not depend on them).

    Raises:
        ValueError: If ``model`` has no decoder layers with ``MultiHeadAttention`` and an MLP ``w1``.
    """
    layers = list(getattr(model, "layers", ()))
    attn = getattr(layers[0], "attn", None) if layers else None
    w1 = getattr(getattr(layers[0], "mlp", None), "w1", None) if layers else None
    if not isinstance(attn, MultiHeadAttention) or w1 is None:
        raise ValueError(f"{type(model).__name__} is not a torchtune decoder with attention and MLP layers")
    q_proj = attn.q_proj
    # LoRALinear keeps its bias flag; a plain Linear has a bias tensor or None.
    bias = getattr(q_proj, "use_bias", getattr(q_proj, "bias", None) is not None)
    sizes = (
        int(model.tok_embeddings.num_embeddings),
        len(layers),
        int(attn.num_heads),
        int(attn.num_kv_heads),
        int(attn.embed_dim),
        int(w1.out_features),
    )
    tied = isinstance(model.output, TiedLinear)
    if not (tied or bias):
        return ModelShape(*sizes)
    return FamilyShape(*sizes, tie_word_embeddings=tied, qkv_bias=bool(bias))
