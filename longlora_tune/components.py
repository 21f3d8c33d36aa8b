"""Resolving the dotted paths that configs name (``collate_fn``, ``_component_``)."""

from __future__ import annotations

import importlib
from typing import Any

from longlora_tune.errors import LongLoRAConfigError

__all__ = ["import_object"]


def import_object(path: str) -> Any:
    """The object a dotted path names, e.g. ``longlora_tune.data.padded_collate_s2``.

    Args:
        path: ``package.module.attribute``.

    Returns:
        The attribute.

    Raises:
        LongLoRAConfigError: if the module or attribute does not exist (one line naming the path).
    """
    module, _, attr = str(path).rpartition(".")
    if not module:
        raise LongLoRAConfigError(f"cannot import {path!r}: give a dotted path such as package.module.name")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise LongLoRAConfigError(f"cannot import {path}: {e}") from e
