"""RoPE extension methods (linear, YaRN, Llama-3) and the one ``rope_scaling`` setting that picks them.

Every method here is one that a Hugging Face ``config.json`` can state exactly, so a model trained with it
and exported is rotated identically by transformers and vLLM:

* ``linear`` -- position interpolation (LongLoRA's method): every frequency divided by ``factor``.
* ``yarn`` -- NTK-by-parts interpolation with an attention temperature (arXiv 2309.00071), Qwen2.5's
  long-context method: high-frequency dimensions are kept, low-frequency ones divided by ``factor``, a
  linear ramp in between, and cos/sin multiplied by the attention factor ``0.1 ln(factor) + 1``.
* ``llama3`` -- Llama 3.1's scaling: wavelengths above ``original / low_freq_factor`` divided by
  ``factor``, below ``original / high_freq_factor`` kept, smoothly blended in between.

The modules compute their frequencies with the same float32 operations, in the same order, as
transformers' rope-init functions (``_compute_{linear_scaling,yarn,llama3}_parameters``), so the cos/sin
tables agree to float32 rounding even at positions in the hundreds of thousands, where one ulp of a
frequency would already move an angle by more than 1e-3. Only the documented formulas are reproduced;
transformers is not imported at run time.

Extending a checkpoint that is already scaled keeps its method (a transformers config holds one
``rope_type``); stacking a second method on top (YaRN over Llama-3, linear over YaRN, ...) cannot be
written in ``config.json`` and is refused. For Llama 3.1 the extension is a larger ``llama3`` factor,
scaled with the context: ``factor * ceil(target / max_position_embeddings)`` (8 -> 16 for 256k).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torchtune.modules import RotaryPositionalEmbeddings

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.position_interpolation import check_rope_factor, position_interpolation_factor

__all__ = [
    "ROPE_REQUEST_KEYS",
    "ROPE_TYPES",
    "SCALED_ROPE_MODULES",
    "LinearScaledRotaryPositionalEmbeddings",
    "Llama3ScaledRotaryPositionalEmbeddings",
    "RopeScaling",
    "YaRNScaledRotaryPositionalEmbeddings",
    "check_rope_request",
    "rope_for_training",
    "yarn_attention_factor",
]

#: The RoPE types LongLoRA trains with ("default" = unscaled RoPE).
ROPE_TYPES = ("default", "linear", "yarn", "llama3")

_YARN_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
_LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor")
# Keys a config.json rope entry may carry besides the ones of its type.
_COMMON_KEYS = {"type", "rope_type", "factor", "rope_theta", "original_max_position_embeddings"}


def _base_wavelengths(dim: int, base: float) -> torch.Tensor:
    """``base ** (2i / dim)`` for ``i < dim / 2`` in float32 (the reciprocal of plain RoPE's frequencies)."""
    return base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)


def _cos_sin_cache(theta: torch.Tensor, max_seq_len: int, attention_factor: float) -> torch.Tensor:
    """torchtune's ``[max_seq_len, dim / 2, 2]`` cos/sin cache, scaled by the attention factor."""
    positions = torch.arange(max_seq_len, dtype=theta.dtype, device=theta.device)
    angles = torch.outer(positions, theta).float()
    # transformers multiplies cos and sin by the factor (so q.k by its square); 1.0 leaves them bit-equal.
    return torch.stack([torch.cos(angles) * attention_factor, torch.sin(angles) * attention_factor], dim=-1)


def yarn_attention_factor(
    factor: float,
    attention_factor: Optional[float] = None,
    mscale: Optional[float] = None,
    mscale_all_dim: Optional[float] = None,
) -> float:
    """YaRN's cos/sin multiplier: explicit, ``mscale``-based (DeepSeek style) or ``0.1 ln(factor) + 1``.

    Args:
        factor: YaRN scaling factor.
        attention_factor: explicit value; wins when given.
        mscale: numerator multiplier of ``ln(factor)``, used only together with ``mscale_all_dim``.
        mscale_all_dim: denominator multiplier of ``ln(factor)``.

    Returns:
        The attention factor (1.0 for ``factor <= 1``).
    """

    def scaled(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(scaled(mscale) / scaled(mscale_all_dim))
    return scaled(1)


class _FrequencyScaledRoPE(RotaryPositionalEmbeddings):
    """torchtune RoPE whose frequencies (and cos/sin magnitude) come from ``_scaled_theta``.

    Subclasses set their settings as plain attributes *before* ``super().__init__`` (which calls
    ``rope_init``), so a model built on the meta device and re-initialised with ``rope_init()`` after
    materialising rebuilds the same tables. Nothing is persistent: state dicts are unchanged.

    ``half_rotation=True`` rotates the two halves of the head (``x[:d/2]``, ``x[d/2:]``) as torchtune's
    ``Qwen2RotaryPositionalEmbeddings`` and transformers do, for checkpoints (Qwen2) whose q/k weights
    torchtune does not permute into interleaved pairs; the default rotates pairs ``(x[2i], x[2i+1])``.
    """

    rope_type = "default"
    scaling_factor = 1.0
    half_rotation = False

    def _set(self, half_rotation: bool, **settings: Any) -> None:
        for key, value in {**settings, "half_rotation": bool(half_rotation)}.items():
            object.__setattr__(self, key, value)

    def _scaled_theta(self, wavelengths: torch.Tensor) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def rope_init(self) -> None:
        """Compute the scaled frequencies and build the cos/sin cache (also after meta-device init)."""
        theta, attention = self._scaled_theta(_base_wavelengths(self.dim, self.base))
        object.__setattr__(self, "attention_factor", attention)
        self.register_buffer("theta", theta, persistent=False)
        self.build_rope_cache(self.max_seq_len)

    def build_rope_cache(self, max_seq_len: int = 4096) -> None:
        """Build the cos/sin cache for positions ``0 .. max_seq_len - 1``.

        Args:
            max_seq_len: Number of positions to cache.
        """
        cache = _cos_sin_cache(self.theta, max_seq_len, getattr(self, "attention_factor", 1.0))
        self.register_buffer("cache", cache, persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate ``x`` [b, s, n_h, h_d] by the cached angles of positions ``0..s-1`` or ``input_pos``.

        Args:
            x: Query or key tensor.
            input_pos: Optional [b, s] positions (packed samples, generation).

        Returns:
            The rotated tensor, same shape and dtype.
        """
        if not self.half_rotation:
            return super().forward(x, input_pos=input_pos)
        rows = self.cache[: x.size(1)] if input_pos is None else self.cache[input_pos]
        rows = rows.view(-1, x.size(1), 1, self.dim // 2, 2)
        # As Qwen2's torchtune module and transformers: cos/sin cast to x's dtype, (x1, x2) -> (-x2, x1).
        cos = torch.cat([rows[..., 0], rows[..., 0]], dim=-1).to(x.dtype)
        sin = torch.cat([rows[..., 1], rows[..., 1]], dim=-1).to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return ((x * cos) + (rotated * sin)).type_as(x)


class LinearScaledRotaryPositionalEmbeddings(_FrequencyScaledRoPE):
    """torchtune RoPE with every position divided by ``scaling_factor`` (linear position interpolation).

    LongLoRA extends a model's context by dividing every position by a factor before the rotary embedding,
    so that a ``factor * L_orig`` token sequence occupies the position range the model was trained on
    (:func:`~longlora_tune.modules.position_interpolation.position_interpolation_factor`). Token ``m`` is
    rotated by ``m * (theta_i / scaling_factor)``, computed exactly as transformers' ``"linear"``
    ``rope_scaling`` does: the frequencies divided, in float32 (``(m / f) * theta`` and
    ``m * (theta / f)`` differ by float32 rounding, which at positions in the tens of thousands moves angles
    by > 1e-4). The one linear module, for interleaved pairs (Llama, Mistral) and head halves (Qwen2).

    The cache holds ``max_seq_len`` positions: set it to the extended (training) length. The factor is a
    plain attribute set before the parent constructor runs, so a model built on the meta device and later
    re-initialised with ``rope_init()`` (as torchtune's distributed recipes do after sharding) rebuilds
    the same scaled cache. ``theta`` holds the scaled frequencies.

    Args:
        dim: Per-head embedding dimension.
        max_seq_len: Number of positions cached (the extended context length).
        base: RoPE base (theta).
        scaling_factor: Linear interpolation factor, >= 1 (1 gives plain RoPE, bit-equal to torchtune's).
        half_rotation: Rotate head halves (Qwen2 checkpoints) instead of interleaved pairs.

    Raises:
        LongLoRAConfigError: If ``scaling_factor`` is not a finite number >= 1.
    """

    rope_type = "linear"

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000,
        scaling_factor: float = 1.0,
        *,
        half_rotation: bool = False,
    ) -> None:
        self._set(half_rotation, scaling_factor=check_rope_factor(scaling_factor, "scaling_factor"))
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def _scaled_theta(self, wavelengths: torch.Tensor) -> tuple[torch.Tensor, float]:
        # torchtune's theta (1 / wavelength), then divided by the factor: the same float32 operations.
        return 1.0 / wavelengths / self.scaling_factor, 1.0

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
            f"scaling_factor={self.scaling_factor}, half_rotation={self.half_rotation}"
        )


class YaRNScaledRotaryPositionalEmbeddings(_FrequencyScaledRoPE):
    """torchtune RoPE with YaRN (``rope_type: yarn``), equal to transformers' YaRN rotary embedding.

    Args:
        dim: Per-head embedding dimension (even).
        max_seq_len: Number of positions cached (the extended context length).
        base: RoPE base (theta).
        factor: YaRN scaling factor (>= 1).
        original_max_seq_len: The unscaled pretraining context (``original_max_position_embeddings``).
        beta_fast: Rotations above which a dimension is kept (extrapolated); 32 by default.
        beta_slow: Rotations below which a dimension is fully interpolated; 1 by default.
        truncate: Round the ramp's ends to whole dimensions (transformers' default True).
        attention_factor: Explicit cos/sin multiplier; None derives it (see :func:`yarn_attention_factor`).
        mscale: See :func:`yarn_attention_factor`.
        mscale_all_dim: See :func:`yarn_attention_factor`.
        half_rotation: Rotate head halves (Qwen2 layout) instead of interleaved pairs.

    Raises:
        ValueError: For a factor below 1, a non-positive length, or betas with ``beta_fast < beta_slow``.
    """

    rope_type = "yarn"

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000,
        *,
        factor: float,
        original_max_seq_len: int,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        truncate: bool = True,
        attention_factor: Optional[float] = None,
        mscale: Optional[float] = None,
        mscale_all_dim: Optional[float] = None,
        half_rotation: bool = False,
    ) -> None:
        settings = dict(
            scaling_factor=check_rope_factor(factor, "factor"),
            original_max_seq_len=_positive_int(original_max_seq_len, "original_max_seq_len"),
            beta_fast=float(beta_fast),
            beta_slow=float(beta_slow),
            truncate=bool(truncate),
            yarn_attention_factor=yarn_attention_factor(
                float(factor), attention_factor, mscale, mscale_all_dim
            ),
        )
        if not 0 < settings["beta_slow"] <= settings["beta_fast"]:
            raise LongLoRAConfigError(
                f"YaRN needs 0 < beta_slow <= beta_fast, got {beta_slow!r} and {beta_fast!r}"
            )
        self._set(half_rotation, **settings)
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def _correction_dim(self, rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return (self.dim * math.log(self.original_max_seq_len / (rotations * 2 * math.pi))) / (
            2 * math.log(self.base)
        )

    def _scaled_theta(self, wavelengths: torch.Tensor) -> tuple[torch.Tensor, float]:
        low, high = self._correction_dim(self.beta_fast), self._correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001  # a one-point ramp would divide by zero
        ramp = torch.clamp((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp.to(device=wavelengths.device, dtype=torch.float)
        kept, interpolated = 1.0 / wavelengths, 1.0 / (self.scaling_factor * wavelengths)
        return interpolated * (1 - keep) + kept * keep, self.yarn_attention_factor

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
            f"factor={self.scaling_factor}, "
            f"original_max_seq_len={self.original_max_seq_len}, beta_fast={self.beta_fast}, "
            f"beta_slow={self.beta_slow}, attention_factor={self.yarn_attention_factor}"
        )


class Llama3ScaledRotaryPositionalEmbeddings(_FrequencyScaledRoPE):
    """torchtune RoPE with Llama 3.1's frequency scaling (``rope_type: llama3``).

    Unlike torchtune's ``Llama3ScaledRoPE`` this is a :class:`RotaryPositionalEmbeddings`, takes any factor,
    and is the one class LongLoRA uses for every ``llama3`` extension.

    Args:
        dim: Per-head embedding dimension (even).
        max_seq_len: Number of positions cached (the extended context length).
        base: RoPE base (theta).
        factor: Divisor of the low frequencies (>= 1); 8 for Llama 3.1.
        original_max_seq_len: The unscaled pretraining context (8192 for Llama 3.1).
        low_freq_factor: Wavelengths above ``original / low_freq_factor`` are divided by ``factor``.
        high_freq_factor: Wavelengths below ``original / high_freq_factor`` are kept.
        half_rotation: Rotate head halves (Qwen2 layout) instead of interleaved pairs.

    Raises:
        ValueError: For a factor below 1, a non-positive length, or ``high_freq_factor <= low_freq_factor``.
    """

    rope_type = "llama3"

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 4096,
        base: float = 500_000,
        *,
        factor: float,
        original_max_seq_len: int,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        half_rotation: bool = False,
    ) -> None:
        if not 0 < float(low_freq_factor) < float(high_freq_factor):
            raise LongLoRAConfigError(
                f"llama3 RoPE needs 0 < low_freq_factor < high_freq_factor, got {low_freq_factor!r} and "
                f"{high_freq_factor!r}"
            )
        self._set(
            half_rotation,
            scaling_factor=check_rope_factor(factor, "factor"),
            original_max_seq_len=_positive_int(original_max_seq_len, "original_max_seq_len"),
            low_freq_factor=float(low_freq_factor),
            high_freq_factor=float(high_freq_factor),
        )
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def _scaled_theta(self, wavelengths: torch.Tensor) -> tuple[torch.Tensor, float]:
        theta = 1.0 / wavelengths
        original, low, high = self.original_max_seq_len, self.low_freq_factor, self.high_freq_factor
        wavelen = 2 * math.pi / theta
        long_waves = torch.where(wavelen > original / low, theta / self.scaling_factor, theta)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * long_waves / self.scaling_factor + smooth * long_waves
        middle = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(middle, blended, long_waves), 1.0

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
            f"factor={self.scaling_factor}, "
            f"original_max_seq_len={self.original_max_seq_len}, low_freq_factor={self.low_freq_factor}, "
            f"high_freq_factor={self.high_freq_factor}"
        )


#: Every RoPE module LongLoRA installs (each has ``scaling_factor`` and ``rope_type``).
SCALED_ROPE_MODULES = (_FrequencyScaledRoPE,)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LongLoRAConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LongLoRAConfigError(f"rope_scaling.{name}={value!r}; it must be a finite number")
    return float(value)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE setting as ``config.json`` states it: the method, its factor, its original context, theta.

    Attributes:
        rope_type: ``default`` (unscaled), ``linear``, ``yarn`` or ``llama3``.
        factor: Scaling factor (1.0 for ``default``).
        original_max_position_embeddings: The unscaled pretraining context the factor refers to.
        rope_theta: RoPE base.
        max_position_embeddings: ``llama3`` only: the context the scaling serves (131072 for Llama 3.1,
            whose factor 8 covers 16x its 8192 original); None for the other types, whose context is
            ``factor * original``.
        low_freq_factor: ``llama3`` only.
        high_freq_factor: ``llama3`` only.
        beta_fast: ``yarn`` only (32 by default).
        beta_slow: ``yarn`` only (1 by default).
        attention_factor: ``yarn`` only: explicit cos/sin multiplier (None: derived).
        mscale: ``yarn`` only (DeepSeek-style attention factor).
        mscale_all_dim: ``yarn`` only.
        truncate: ``yarn`` only: round the ramp ends (True by default; ``False`` needs transformers 4.57+).
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10_000.0
    max_position_embeddings: Optional[int] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: Optional[bool] = None

    def __post_init__(self) -> None:
        t = self.rope_type
        if t not in ROPE_TYPES:
            raise LongLoRAConfigError(
                f"rope_scaling type {t!r} is not supported; use one of {', '.join(ROPE_TYPES)}"
            )
        try:
            object.__setattr__(self, "factor", check_rope_factor(self.factor, "rope_scaling.factor"))
            _positive_int(
                self.original_max_position_embeddings, "rope_scaling.original_max_position_embeddings"
            )
        except ValueError as err:
            raise LongLoRAConfigError(str(err)) from None
        object.__setattr__(self, "rope_theta", _number(self.rope_theta, "rope_theta"))
        if self.rope_theta <= 1:
            raise LongLoRAConfigError(f"rope_theta={self.rope_theta!r}; it must be > 1")
        if t == "default" and self.factor != 1.0:
            raise LongLoRAConfigError(f"rope_scaling type default has factor {self.factor}; use type linear")
        own = {"yarn": _YARN_KEYS, "llama3": (*_LLAMA3_KEYS, "max_position_embeddings")}.get(t, ())
        stray = [k for k in (*_YARN_KEYS, *_LLAMA3_KEYS, "max_position_embeddings") if k not in own]
        stray = [k for k in stray if getattr(self, k) is not None]
        if stray:
            raise LongLoRAConfigError(f"rope_scaling type {t} does not take {', '.join(stray)}; remove them")
        if t == "yarn":
            object.__setattr__(self, "beta_fast", _number(self.beta_fast or 32.0, "beta_fast"))
            object.__setattr__(self, "beta_slow", _number(self.beta_slow or 1.0, "beta_slow"))
            object.__setattr__(self, "truncate", True if self.truncate is None else self.truncate)
            if not isinstance(self.truncate, bool):
                raise LongLoRAConfigError(
                    f"rope_scaling.truncate={self.truncate!r}; it must be true or false"
                )
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, key) is not None:
                    object.__setattr__(self, key, _number(getattr(self, key), key))
            context = self.factor * self.original_max_position_embeddings
            if context != int(context):
                # transformers 4.51-4.56 re-derive the factor as max_position_embeddings / original.
                raise LongLoRAConfigError(
                    f"rope_scaling yarn factor {self.factor} x original "
                    f"{self.original_max_position_embeddings} is not a whole context length; pick a factor "
                    "that gives one"
                )
        if t == "llama3":
            low = _number(1.0 if self.low_freq_factor is None else self.low_freq_factor, "low_freq_factor")
            high = _number(
                4.0 if self.high_freq_factor is None else self.high_freq_factor, "high_freq_factor"
            )
            if not 0 < low < high:
                raise LongLoRAConfigError(
                    f"rope_scaling llama3 low_freq_factor={low}, high_freq_factor={high}; need 0 < low < high"
                )
            object.__setattr__(self, "low_freq_factor", low)
            object.__setattr__(self, "high_freq_factor", high)
            original = self.original_max_position_embeddings
            mpe = self.max_position_embeddings
            if mpe is None:
                mpe = int(math.ceil(self.factor * original))
            if isinstance(mpe, bool) or not isinstance(mpe, int) or mpe <= original:
                raise LongLoRAConfigError(
                    f"rope_scaling llama3 max_position_embeddings={mpe!r}; it must be an int above the "
                    f"original {original}"
                )
            object.__setattr__(self, "max_position_embeddings", mpe)

    @property
    def context_len(self) -> int:
        """The context this scaling serves (the exported ``max_position_embeddings`` for yarn/llama3)."""
        if self.rope_type == "llama3":
            return int(self.max_position_embeddings)  # type: ignore[arg-type]
        return int(math.ceil(self.factor * self.original_max_position_embeddings))

    # ------------------------------------------------------------------ config.json

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> RopeScaling:
        """Read the RoPE setting of a Hugging Face ``config.json`` (transformers 4 or 5 spelling).

        ``rope_scaling`` (transformers 4, and preferred by transformers 5 when present) or
        ``rope_parameters`` (transformers 5); when both are present they must describe the same scaling.
        ``rope_theta`` comes from the entry, the top level, or 10000. For ``linear``/unscaled configs the
        original context is ``max_position_embeddings`` (4096 if absent); ``yarn``/``llama3`` entries carry
        ``original_max_position_embeddings`` (falling back to ``max_position_embeddings``, as transformers 5).

        Args:
            config: The parsed ``config.json``.

        Returns:
            The setting.

        Raises:
            LongLoRAConfigError: For a RoPE type LongLoRA cannot train with (dynamic, longrope, ...),
                unknown keys, bad values, or disagreeing entries.
        """
        if not isinstance(config, Mapping):
            raise LongLoRAConfigError(f"config.json must be a JSON object, got {type(config).__name__}")
        parsed = []
        for key in ("rope_scaling", "rope_parameters"):
            entry = config.get(key)
            if entry is None:
                continue
            if not isinstance(entry, Mapping):
                raise LongLoRAConfigError(f"config.json {key}={entry!r}; it must be an object or null")
            if entry:
                parsed.append((key, cls._from_entry(config, entry, key)))
        if not parsed:
            return cls._from_entry(config, {}, "rope_scaling")
        if len(parsed) == 2:
            (_, first), (_, second) = parsed
            if dataclasses.replace(second, rope_theta=first.rope_theta) != first:
                raise LongLoRAConfigError(
                    "config.json rope_scaling and rope_parameters describe different RoPE scalings; "
                    "make them equal"
                )
        return parsed[0][1]

    @classmethod
    def _from_entry(cls, config: Mapping[str, Any], entry: Mapping[str, Any], where: str) -> RopeScaling:
        rope_type = entry.get("rope_type", entry.get("type")) or "default"
        if rope_type not in ROPE_TYPES:
            raise LongLoRAConfigError(
                f"config.json {where} has RoPE type {rope_type!r}; LongLoRA continues from "
                f"{', '.join(ROPE_TYPES)} only"
            )
        allowed = _COMMON_KEYS | set({"yarn": _YARN_KEYS, "llama3": _LLAMA3_KEYS}.get(rope_type, ()))
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise LongLoRAConfigError(
                f"config.json {where} ({rope_type}) has keys LongLoRA cannot reproduce: {', '.join(unknown)}"
            )
        theta = entry.get("rope_theta") or config.get("rope_theta") or 10_000.0
        if where == "rope_scaling" and "rope_theta" not in entry and not config.get("rope_theta"):
            theta = (config.get("rope_parameters") or {}).get("rope_theta") or theta
        mpe = config.get("max_position_embeddings", 4096)
        fields: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta}
        if rope_type == "default":
            fields["original_max_position_embeddings"] = mpe
        elif rope_type == "linear":
            if "factor" not in entry:
                raise LongLoRAConfigError(f"config.json {where} is linear but has no factor; add one")
            fields.update(factor=entry["factor"], original_max_position_embeddings=mpe)
        else:
            original = entry.get("original_max_position_embeddings") or mpe
            factor = entry.get("factor")
            if factor is None:
                if rope_type == "llama3":
                    raise LongLoRAConfigError(f"config.json {where} is llama3 but has no factor; add one")
                factor = mpe / original  # transformers 5's YaRN fallback
            fields.update(factor=factor, original_max_position_embeddings=original)
            keys = _YARN_KEYS if rope_type == "yarn" else _LLAMA3_KEYS
            fields.update({k: entry[k] for k in keys if k in entry})
            if rope_type == "llama3":
                fields["max_position_embeddings"] = mpe
        return cls(**fields)

    def rope_entry(self) -> Optional[dict[str, Any]]:
        """The ``rope_scaling`` object (both ``type`` and ``rope_type`` keys); None for unscaled RoPE.

        Returns:
            The entry, or None.
        """
        if self.rope_type == "default":
            return None
        entry: dict[str, Any] = {"type": self.rope_type, "rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type in ("yarn", "llama3"):
            entry["original_max_position_embeddings"] = self.original_max_position_embeddings
            for key in _YARN_KEYS if self.rope_type == "yarn" else _LLAMA3_KEYS:
                value = getattr(self, key)
                # truncate=True is every transformers version's behaviour; 4.45-4.56 do not read the key.
                if value is not None and not (key == "truncate" and value):
                    entry[key] = value
        return entry

    def to_hf_config(self, base_config: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The ``config.json`` keys that state this setting (update the base config with them).

        Always ``rope_theta`` (top level: transformers 4 reads it there, transformers 5 takes it as the
        theta of ``rope_scaling``), ``rope_scaling`` (None when unscaled) and ``max_position_embeddings``
        (the unscaled context for default/linear, as LongLoRA always wrote it; ``factor * original`` for
        yarn, since transformers 4.51-4.56 re-derive the YaRN factor from that ratio; the served context
        for llama3). ``rope_parameters`` (transformers 5 spelling, with ``rope_theta`` inside) is added
        when ``base_config`` has one, so the two never disagree.

        Args:
            base_config: The base model's ``config.json`` (only its spelling is read).

        Returns:
            The keys to set.
        """
        out: dict[str, Any] = {
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_entry(),
            "max_position_embeddings": (
                self.original_max_position_embeddings
                if self.rope_type in ("default", "linear")
                else self.context_len
            ),
        }
        if base_config is not None and isinstance(base_config.get("rope_parameters"), Mapping):
            params = {k: v for k, v in (self.rope_entry() or {"rope_type": "default"}).items() if k != "type"}
            out["rope_parameters"] = {**params, "rope_theta": self.rope_theta}
        return out

    # ------------------------------------------------------------------ modules and extension

    def build_module(
        self, dim: int, max_seq_len: int, base: Optional[float] = None, *, half_rotation: bool = False
    ) -> RotaryPositionalEmbeddings:
        """The torchtune positional-embedding module computing this setting's rotations.

        Args:
            dim: Per-head dimension.
            max_seq_len: Number of positions cached (the training/eval length).
            base: RoPE base; None uses ``rope_theta``.
            half_rotation: Rotate head halves (Qwen2 checkpoints, replacing torchtune's
                ``Qwen2RotaryPositionalEmbeddings``) instead of interleaved pairs.

        Returns:
            A :class:`LinearScaledRotaryPositionalEmbeddings` (``default`` gives factor 1),
            :class:`YaRNScaledRotaryPositionalEmbeddings` or :class:`Llama3ScaledRotaryPositionalEmbeddings`,
            with this setting as its ``rope_scaling`` attribute.
        """
        module = self._build_module(
            dim, max_seq_len, self.rope_theta if base is None else base, half_rotation
        )
        # Plain attribute (no state): describe() reads the exact setting back for exports and eval.
        object.__setattr__(module, "rope_scaling", self)
        return module

    def _build_module(
        self, dim: int, max_seq_len: int, base: float, half_rotation: bool
    ) -> RotaryPositionalEmbeddings:
        if self.rope_type in ("default", "linear"):
            return LinearScaledRotaryPositionalEmbeddings(
                dim, max_seq_len, base, scaling_factor=self.factor, half_rotation=half_rotation
            )
        original = self.original_max_position_embeddings
        if self.rope_type == "yarn":
            return YaRNScaledRotaryPositionalEmbeddings(
                dim,
                max_seq_len,
                base,
                factor=self.factor,
                original_max_seq_len=original,
                beta_fast=self.beta_fast,  # type: ignore[arg-type]
                beta_slow=self.beta_slow,  # type: ignore[arg-type]
                truncate=bool(self.truncate),
                attention_factor=self.attention_factor,
                mscale=self.mscale,
                mscale_all_dim=self.mscale_all_dim,
                half_rotation=half_rotation,
            )
        return Llama3ScaledRotaryPositionalEmbeddings(
            dim,
            max_seq_len,
            base,
            factor=self.factor,
            original_max_seq_len=original,
            low_freq_factor=self.low_freq_factor,  # type: ignore[arg-type]
            high_freq_factor=self.high_freq_factor,  # type: ignore[arg-type]
            half_rotation=half_rotation,
        )

    def extend(self, target_len: int, rope_type: Optional[str] = None) -> RopeScaling:
        """The setting for training (or evaluating a model trained) at ``target_len`` tokens.

        ``rope_type`` None keeps this setting's method (``linear`` for an unscaled checkpoint). The factor
        never decreases (a lower one would move every position the checkpoint has learned):

        * ``linear``: ``max(factor, ceil(target / original))`` (LongLoRA's rule, unchanged);
        * ``yarn``: ``max(factor, ceil(target / original))``; betas and attention settings are kept;
        * ``llama3``: ``factor * ceil(target / context_len)`` and the context scaled alike, so Llama 3.1
          (8 for 128k) becomes 16 for 256k: the smallest such factor under which no dimension turns
          further at ``target`` than it did at the trained length. From unscaled RoPE
          it is ``ceil(target / original)`` with Meta's low/high frequency factors 1 and 4.

        A second method on top of an existing one (yarn over llama3 or linear, linear over yarn, ...) is
        not a single ``rope_type`` and cannot be exported exactly, so it is refused.

        Args:
            target_len: Context length to support (the training sequence length).
            rope_type: Method to extend with; None keeps the current one.

        Returns:
            The new setting (this one when it already covers ``target_len``).

        Raises:
            LongLoRAConfigError: For a combination ``config.json`` cannot express, or a bad length.
        """
        if isinstance(target_len, bool) or not isinstance(target_len, int) or target_len < 1:
            raise LongLoRAConfigError(f"target length {target_len!r}; it must be a positive int")
        current = self.rope_type
        wanted = rope_type or ("linear" if current == "default" else current)
        if wanted not in ROPE_TYPES[1:]:
            raise LongLoRAConfigError(f"rope_scaling type {wanted!r}; use one of linear, yarn, llama3")
        if current not in ("default", wanted):
            raise LongLoRAConfigError(
                f"rope_scaling {wanted} over the checkpoint's own {current} scaling cannot be written as one "
                f"config.json rope_type (transformers/vLLM apply one); use rope_scaling type {current}"
            )
        original = self.original_max_position_embeddings
        if wanted == "linear":
            factor = position_interpolation_factor(target_len, original, self.factor)
            return dataclasses.replace(self, rope_type="linear", factor=factor)
        if wanted == "yarn":
            factor = float(max(self.factor, math.ceil(target_len / original)))
            return (
                self if factor == self.factor else dataclasses.replace(self, rope_type="yarn", factor=factor)
            )
        if current == "default":
            factor = float(math.ceil(target_len / original))
            if factor == 1.0:
                return self
            return dataclasses.replace(self, rope_type="llama3", factor=factor, max_position_embeddings=None)
        steps = math.ceil(target_len / self.context_len)
        if steps <= 1:
            return self
        return dataclasses.replace(
            self, factor=self.factor * steps, max_position_embeddings=self.context_len * steps
        )


#: Keys of the recipe's ``rope_scaling`` request (and the builders' ``rope_scaling`` argument).
ROPE_REQUEST_KEYS = ("type", "factor", "original_max_position_embeddings")


def check_rope_request(request: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """Validate a ``rope_scaling`` request: ``{type: linear|yarn|llama3, factor: f, original_...: n}``.

    ``factor`` (>= 1) is optional: None derives it from the training length (:meth:`RopeScaling.extend`).
    ``original_max_position_embeddings`` (yarn/llama3 only) names the context the factor multiplies when
    the checkpoint's ``max_position_embeddings`` is not its pretraining context (Qwen2.5 7B+ state 131072
    but were pretrained at 32768, the context Qwen's YaRN recipe scales).

    Args:
        request: The mapping, or None (the family's default).

    Returns:
        A plain dict with the keys given (``type`` always), or None.

    Raises:
        LongLoRAConfigError: One line naming the bad key or value.
    """
    if request is None:
        return None
    if not isinstance(request, Mapping):
        raise LongLoRAConfigError(
            f"rope_scaling={request!r}; use a mapping such as {{type: yarn, factor: 4}} or null"
        )
    out = {str(k): v for k, v in request.items()}
    unknown = sorted(set(out) - set(ROPE_REQUEST_KEYS))
    if unknown:
        raise LongLoRAConfigError(
            f"rope_scaling has unknown keys {unknown}; it takes {', '.join(ROPE_REQUEST_KEYS)}"
        )
    rope_type = out.get("type")
    if rope_type not in ROPE_TYPES[1:]:
        raise LongLoRAConfigError(f"rope_scaling.type={rope_type!r}; use one of linear, yarn, llama3")
    if out.get("factor") is not None:
        try:
            out["factor"] = check_rope_factor(out["factor"], "rope_scaling.factor")
        except ValueError as err:
            raise LongLoRAConfigError(str(err)) from None
    original = out.get("original_max_position_embeddings")
    if original is not None:
        if rope_type == "linear":
            raise LongLoRAConfigError(
                "rope_scaling.original_max_position_embeddings is for yarn and llama3 (linear scales the "
                "checkpoint's max_position_embeddings); remove it"
            )
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise LongLoRAConfigError(
                f"rope_scaling.original_max_position_embeddings={original!r}; it must be a positive int"
            )
    return out


def rope_for_training(
    checkpoint: RopeScaling,
    target_len: int,
    *,
    request: Optional[Mapping[str, Any]] = None,
    default_type: str = "linear",
) -> RopeScaling:
    """The RoPE setting a model trained (or evaluated after training) at ``target_len`` tokens uses.

    Starts from the checkpoint's own setting and extends it by one method, so the result is always one
    ``config.json`` ``rope_type``:

    * no request: :meth:`RopeScaling.extend` with the checkpoint's method, or ``default_type`` (the
      family's default) for an unscaled checkpoint;
    * ``{type}``: extend with that method (refused over a different existing method);
    * ``{type, factor}``: exactly that factor, never below the checkpoint's own (a lower one would move
      positions it learned). A larger ``llama3`` factor scales the served
      context alike (Llama 3.1's 8 for 128k -> 16 for 256k), as :meth:`RopeScaling.extend` does.

    Args:
        checkpoint: The base checkpoint's setting (:meth:`RopeScaling.from_hf_config`).
        target_len: Training sequence length.
        request: A :func:`check_rope_request` mapping, or None.
        default_type: The method an unscaled checkpoint is extended with when ``request`` is None.

    Returns:
        The setting.

    Raises:
        LongLoRAConfigError: For a request ``config.json`` cannot express, or bad values.
    """
    request = check_rope_request(request)
    if request is None:
        return checkpoint.extend(target_len, None if checkpoint.rope_type != "default" else default_type)
    rope_type, factor = request["type"], request.get("factor")
    original = request.get("original_max_position_embeddings")
    current = checkpoint.rope_type
    if current not in ("default", rope_type):
        # extend() words the refusal (one rope_type per config.json).
        checkpoint.extend(target_len, rope_type)
    if (
        original is not None
        and current != "default"
        and original != checkpoint.original_max_position_embeddings
    ):
        raise LongLoRAConfigError(
            f"rope_scaling.original_max_position_embeddings={original} but the checkpoint is already "
            f"{current}-scaled from {checkpoint.original_max_position_embeddings}; remove it"
        )
    base = checkpoint
    if current == "default" and original is not None:
        base = dataclasses.replace(checkpoint, original_max_position_embeddings=original)
    if factor is None:
        return base.extend(target_len, rope_type)
    if factor < checkpoint.factor:
        raise LongLoRAConfigError(
            f"rope_scaling.factor={factor} is below the checkpoint's own {current} factor "
            f"{checkpoint.factor}; positions it learned would move: use at least {checkpoint.factor}"
        )
    if current == "default" and factor == 1.0 and rope_type != "linear":
        result = checkpoint
    elif current == "default":
        result = RopeScaling(
            rope_type=rope_type,
            factor=factor,
            original_max_position_embeddings=base.original_max_position_embeddings,
            rope_theta=checkpoint.rope_theta,
        )
    else:
        changes: dict[str, Any] = {"factor": factor}
        if rope_type == "llama3":
            changes["max_position_embeddings"] = int(
                round(checkpoint.context_len * factor / checkpoint.factor)
            )
        result = dataclasses.replace(checkpoint, **changes)
    return result
