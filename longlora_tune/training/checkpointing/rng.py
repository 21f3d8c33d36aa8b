"""The random number generators a checkpoint saves per rank, so a resumed run draws the same numbers.

numpy's state becomes tensors and plain numbers, so ``torch.load(weights_only=True)`` reads it back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state(device: torch.device) -> dict[str, Any]:
    """Capture this process's random number generators (torch CPU, CUDA of ``device``, Python, numpy).

    Args:
        device: the training device; its CUDA generator is included when it is a CUDA device.

    Returns:
        A state that ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore generators captured by :func:`rng_state` (the CUDA one only when both sides have it).

    Args:
        state: what :func:`rng_state` returned (possibly after a save/load round trip).
        device: the training device.
    """
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
