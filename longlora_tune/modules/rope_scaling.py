"""The RoPE modules LongLoRA installs: linear, YaRN and Llama-3 frequency scaling of torchtune's RoPE.

Every method here is one that a Hugging Face ``config.json`` can state exactly
(:class:`longlora_tune.modules.rope_config.RopeScaling` is the setting that picks one), so a model trained
with it and exported is rotated identically by transformers and vLLM:

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
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torchtune.modules import RotaryPositionalEmbeddings

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.position_interpolation import check_positive_int, check_rope_factor

__all__ = [
    "SCALED_ROPE_MODULES",
    "LinearScaledRotaryPositionalEmbeddings",
    "Llama3ScaledRotaryPositionalEmbeddings",
    "YaRNScaledRotaryPositionalEmbeddings",
    "build_rope_module",
    "yarn_attention_factor",
]


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
            original_max_seq_len=check_positive_int(original_max_seq_len, "original_max_seq_len"),
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
            original_max_seq_len=check_positive_int(original_max_seq_len, "original_max_seq_len"),
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


def build_rope_module(
    setting: Any, dim: int, max_seq_len: int, base: Optional[float] = None, *, half_rotation: bool = False
) -> RotaryPositionalEmbeddings:
    """The torchtune positional-embedding module computing a RoPE setting's rotations.

    Args:
        setting: the :class:`~longlora_tune.modules.rope_config.RopeScaling`.
        dim: Per-head dimension.
        max_seq_len: Number of positions cached (the training/eval length).
        base: RoPE base; None uses the setting's ``rope_theta``.
        half_rotation: Rotate head halves (Qwen2 checkpoints, replacing torchtune's
            ``Qwen2RotaryPositionalEmbeddings``) instead of interleaved pairs.

    Returns:
        A :class:`LinearScaledRotaryPositionalEmbeddings` (``default`` gives factor 1),
        :class:`YaRNScaledRotaryPositionalEmbeddings` or :class:`Llama3ScaledRotaryPositionalEmbeddings`,
        with the setting as its ``rope_scaling`` attribute (a plain attribute, no state: ``describe()``
        reads the exact setting back for exports and eval).
    """
    base = setting.rope_theta if base is None else base
    module = _module_for(setting, dim, max_seq_len, base, half_rotation)
    object.__setattr__(module, "rope_scaling", setting)
    return module


def _module_for(
    setting: Any, dim: int, max_seq_len: int, base: float, half_rotation: bool
) -> RotaryPositionalEmbeddings:
    if setting.rope_type in ("default", "linear"):
        return LinearScaledRotaryPositionalEmbeddings(
            dim, max_seq_len, base, scaling_factor=setting.factor, half_rotation=half_rotation
        )
    original = setting.original_max_position_embeddings
    if setting.rope_type == "yarn":
        return YaRNScaledRotaryPositionalEmbeddings(
            dim,
            max_seq_len,
            base,
            factor=setting.factor,
            original_max_seq_len=original,
            beta_fast=setting.beta_fast,  # type: ignore[arg-type]
            beta_slow=setting.beta_slow,  # type: ignore[arg-type]
            truncate=bool(setting.truncate),
            attention_factor=setting.attention_factor,
            mscale=setting.mscale,
            mscale_all_dim=setting.mscale_all_dim,
            half_rotation=half_rotation,
        )
    return Llama3ScaledRotaryPositionalEmbeddings(
        dim,
        max_seq_len,
        base,
        factor=setting.factor,
        original_max_seq_len=original,
        low_freq_factor=setting.low_freq_factor,  # type: ignore[arg-type]
        high_freq_factor=setting.high_freq_factor,  # type: ignore[arg-type]
        half_rotation=half_rotation,
    )
