"""Resolving the dotted paths that configs name (``collate_fn``, ``_component_``)."""

from __future__ import annotations

import importlib
from typing import Any

from longlora_tune.errors import LongLoRAConfigError

__all__ = ["import_object"]


def import_object(path: Any, where: str = "component") -> Any:
    """Import the object a ``_component_`` names (``package.module.attribute``, as torchtune resolves it).

    Args:
        path: the dotted path.
        where: the config key, for the message (``model._component_``).

    Returns:
        The object.

    Raises:
        LongLoRAConfigError: if the path is not a string or cannot be imported.
    """
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise LongLoRAConfigError(f"{where}={path!r} must be a dotted path such as torch.optim.AdamW")
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], start=1):
            if hasattr(obj, part):
                obj = getattr(obj, part)
            else:
                # Not an attribute (yet): a submodule that its package does not import itself.
                obj = importlib.import_module(".".join(parts[: i + 1]))
    except ImportError as e:
        raise LongLoRAConfigError(f"{where}={path} cannot be imported ({e}); check the dotted path") from e
    return obj
