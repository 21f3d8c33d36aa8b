"""The RoPE setting of a model as ``config.json`` states it (:class:`RopeScaling`), read and written.

The one reader of a Hugging Face config's RoPE (``rope_scaling``, transformers 4, and ``rope_parameters``,
transformers 5, with ``rope_theta`` beside or inside), the ``rope_scaling`` request of our configs and
builders, and the rule that extends a setting to a training length. Extending a checkpoint that is already
scaled keeps its method (a transformers config holds one ``rope_type``); stacking a second method on top
(YaRN over Llama-3, linear over YaRN, ...) cannot be written in ``config.json`` and is refused. For Llama 3.1
the extension is a larger ``llama3`` factor, scaled with the context:
``factor * ceil(target / max_position_embeddings)`` (8 -> 16 for 256k).

Torch-free: the family detection, the config checks and the planner read it cheaply; the modules that
rotate by a setting are in :mod:`longlora_tune.modules.rope_scaling`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional

from longlora_tune.errors import LongLoRAConfigError
from longlora_tune.modules.position_interpolation import (
    check_positive_int,
    check_rope_factor,
    position_interpolation_factor,
)

__all__ = [
    "ROPE_REQUEST_KEYS",
    "ROPE_TYPES",
    "RopeScaling",
    "check_rope_request",
    "hf_rope_entries",
    "hf_rope_theta",
    "hf_rope_type",
    "rope_for_training",
]

#: The RoPE types LongLoRA trains with ("default" = unscaled RoPE).
ROPE_TYPES = ("default", "linear", "yarn", "llama3")

_YARN_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
_LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor")
# Keys a config.json rope entry may carry besides the ones of its type.
_COMMON_KEYS = {"type", "rope_type", "factor", "rope_theta", "original_max_position_embeddings"}


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LongLoRAConfigError(f"rope_scaling.{name}={value!r}; it must be a finite number")
    return float(value)


def hf_rope_entries(config: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The RoPE entries of a Hugging Face ``config.json``, in the order transformers prefers them.

    ``rope_scaling`` (transformers 4, and preferred by transformers 5 when present), then
    ``rope_parameters`` (transformers 5, with ``rope_theta`` inside); null and empty entries are left out.

    Args:
        config: the parsed ``config.json``.

    Returns:
        ``(key, entry)`` pairs (none for an unscaled transformers 4 config).

    Raises:
        LongLoRAConfigError: for a config or an entry that is not a JSON object.
    """
    if not isinstance(config, Mapping):
        raise LongLoRAConfigError(f"config.json must be a JSON object, got {type(config).__name__}")
    entries = []
    for key in ("rope_scaling", "rope_parameters"):
        entry = config.get(key)
        if entry is not None and not isinstance(entry, Mapping):
            raise LongLoRAConfigError(f"config.json {key}={entry!r}; it must be an object or null")
        if entry:
            entries.append((key, entry))
    return entries


def hf_rope_type(entry: Mapping[str, Any]) -> str:
    """The RoPE type of one ``config.json`` entry (``rope_type``, transformers 4's ``type``, or default).

    Args:
        entry: a :func:`hf_rope_entries` entry.

    Returns:
        The type name as written (``default`` when it names none).
    """
    return entry.get("rope_type", entry.get("type")) or "default"


def hf_rope_theta(config: Mapping[str, Any], entry: Optional[Mapping[str, Any]] = None) -> Any:
    """The RoPE base of a ``config.json``: the entry's own ``rope_theta``, the top-level one (transformers
    4), the one inside ``rope_parameters`` (transformers 5 writes it only there), or 10000.

    Args:
        config: the parsed ``config.json``.
        entry: the :func:`hf_rope_entries` entry being read, if any.

    Returns:
        The value as written (checked by :class:`RopeScaling`).
    """
    params = config.get("rope_parameters")
    params = params if isinstance(params, Mapping) else {}
    return (entry or {}).get("rope_theta") or config.get("rope_theta") or params.get("rope_theta") or 10_000.0


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
            check_positive_int(
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
        parsed = [(key, cls._from_entry(config, entry, key)) for key, entry in hf_rope_entries(config)]
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
        rope_type = hf_rope_type(entry)
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
        theta = hf_rope_theta(config, entry)
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

    def build_module(
        self, dim: int, max_seq_len: int, base: Optional[float] = None, *, half_rotation: bool = False
    ) -> Any:
        """The torchtune positional-embedding module computing this setting's rotations
        (:func:`longlora_tune.modules.rope_scaling.build_rope_module`; imports torch).

        Args:
            dim: Per-head dimension.
            max_seq_len: Number of positions cached (the training/eval length).
            base: RoPE base; None uses ``rope_theta``.
            half_rotation: Rotate head halves (Qwen2 checkpoints, replacing torchtune's
                ``Qwen2RotaryPositionalEmbeddings``) instead of interleaved pairs.

        Returns:
            The module, with this setting as its ``rope_scaling`` attribute.
        """
        from longlora_tune.modules.rope_scaling import build_rope_module

        return build_rope_module(self, dim, max_seq_len, base, half_rotation=half_rotation)

    # ------------------------------------------------------------------ extension

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
