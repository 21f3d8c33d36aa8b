"""What the lent GPU machine has, what ``scripts/prepare_gpu_wheels.sh`` adds, and a local imitation of both.

The lent machine (one H200, CPython 3.12, no internet) has torch and the packages in
:data:`GPU_MACHINE_PACKAGES` (with whatever they depend on) but not torchtune, torchao, torchdata, omegaconf
or datasets. ``scripts/prepare_gpu_wheels.sh`` downloads the missing wheels into ``.whl/`` here;
``scripts/gpu_check.sh`` installs them there with ``pip install --no-index --no-deps --target``.

:func:`imitate_gpu_site` builds, from this environment, a folder holding only the GPU machine's packages
(and their requirements, resolved from installed metadata) so that a dry run can import the check's modules
with nothing else on ``sys.path`` and find a missing wheel before a GPU is ever lent.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shlex
from pathlib import Path

__all__ = [
    "GPU_MACHINE_PACKAGES",
    "PINNED_OVER_GPU_MACHINE",
    "distribution_closure",
    "imitate_gpu_site",
    "normalize",
    "wheel_specs",
]

#: Distributions the lent GPU machine has installed (its description; their requirements are there too).
GPU_MACHINE_PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "sentencepiece",
    "tiktoken",
    "pyarrow",
    "numpy",
)

#: Pure-Python distributions the machine has but in a version we cannot use, so a wheel of our pinned
#: version is installed ahead of it: peft >= 0.19 raises on the first LoRA layer when it finds torchao < 0.16
#: (which torchtune 0.6.1 needs), and the lent machine's peft is 0.21.
PINNED_OVER_GPU_MACHINE: tuple[str, ...] = ("peft",)

_WHEELS_START = "# --- wheels ---"
_WHEELS_END = "# --- end wheels ---"


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name (``Python_DateUtil`` -> ``python-dateutil``).

    Args:
        name: A distribution name.

    Returns:
        The normalised name.
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_specs(script: Path) -> dict[str, str]:
    """The pinned requirements listed in ``prepare_gpu_wheels.sh`` between its wheel markers.

    Args:
        script: Path of ``prepare_gpu_wheels.sh``.

    Returns:
        Normalised distribution name -> requirement as written (``torchtune==0.6.1``).

    Raises:
        ValueError: If the markers are missing or a spec is not pinned with ``==``.
    """
    text = script.read_text()
    if _WHEELS_START not in text or _WHEELS_END not in text:
        raise ValueError(f"{script}: no '{_WHEELS_START}' ... '{_WHEELS_END}' block")
    block = text.split(_WHEELS_START, 1)[1].split(_WHEELS_END, 1)[0]
    specs = {}
    for token in shlex.split(block, comments=True):
        if not re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", token):
            continue  # shell syntax around the list (WHEELS=( ... ))
        name = token.split("==", 1)[0]
        specs[normalize(name)] = token
    if not specs:
        raise ValueError(f"{script}: the wheel block lists no 'name==version' specs")
    return specs


def distribution_closure(names: tuple[str, ...] | list[str]) -> dict[str, md.Distribution]:
    """Installed distributions ``names`` and everything they require (no extras), from this environment.

    Args:
        names: Distribution names.

    Returns:
        Normalised name -> distribution; requirements not installed here are left out.
    """
    from packaging.requirements import Requirement  # packaging is a pip/pytest/transformers dependency

    found: dict[str, md.Distribution] = {}
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = normalize(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return found


def _top_level_entries(dist: md.Distribution) -> set[str]:
    entries = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        entries.add(first)
    return entries


def imitate_gpu_site(dest: Path, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Symlink the GPU machine's distributions (and ``extra`` ones) from this environment into ``dest``.

    Args:
        dest: An empty folder; gets one link per top-level module, package and ``.dist-info``.
        extra: More distributions to link from here, without their requirements (the installed copy of a
            distribution stands in for a cp312-only wheel that this Python cannot install).

    Returns:
        The normalised names of the distributions linked.
    """
    dest.mkdir(parents=True, exist_ok=True)
    dists = distribution_closure(GPU_MACHINE_PACKAGES)
    for name in extra:
        dists[normalize(name)] = md.distribution(name)
    for dist in dists.values():
        root = Path(str(dist.locate_file("")))
        for entry in _top_level_entries(dist):
            link = dest / entry
            if not link.exists() and (root / entry).exists():
                link.symlink_to(root / entry)
    return sorted(dists)
