"""The GPU check's import phase: import every module ``scripts/gpu_check.sh`` runs and print versions.

Run ``python -m benchmarks.gpu_imports``. Exits 1, naming each module that failed, if any import
fails, so that a missing wheel shows up in seconds (and in the dry run here, see
``tests/test_gpu_check.py``) rather than minutes into a run on a lent GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__all__ = ["CHECK_MODULES", "CHECK_FILES", "main"]

#: Modules the GPU check imports: third-party ones named for their versions, then the project's entry points.
CHECK_MODULES: tuple[str, ...] = (
    "torch",
    "torchtune",
    "torchao",
    "torchdata",
    "omegaconf",
    "datasets",
    "transformers",
    "peft",
    "safetensors",
    "torchtune.training",
    "torchtune.models.llama2",
    "longlora_tune",
    "benchmarks.__main__",
    "benchmarks.backend_check",
    "benchmarks.peer",
    "benchmarks.recipe_check",
)

#: Files the check runs by path (the recipe, under ``tune run``), imported here as plain modules to resolve
#: their imports.
CHECK_FILES: tuple[str, ...] = ("recipes/longlora_distributed.py",)


def _build_peft_lora_layer() -> None:
    # peft >= 0.19 imports fine next to torchao < 0.16 and raises only when it builds its first LoRA layer,
    # which is how the first lent H200 lost the peer benchmark: build one here, in seconds.
    import torch
    from peft import LoraConfig, get_peft_model

    get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))


def main() -> int:
    """Import :data:`CHECK_MODULES` and :data:`CHECK_FILES`, one line per module, and build a PEFT layer.

    Returns:
        0 if everything imported and the PEFT layer was built, 1 otherwise.
    """
    failed = []
    for name in CHECK_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # report every module, not only the first failure
            failed.append(name)
            print(f"FAIL import {name}: {type(err).__name__}: {err}", flush=True)
            continue
        version = getattr(module, "__version__", "")
        print(f"ok   import {name} {version}".rstrip(), flush=True)
    repo = Path(__file__).resolve().parents[1]
    for rel in CHECK_FILES:
        path = repo / rel
        try:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except Exception as err:
            failed.append(rel)
            print(f"FAIL import {rel}: {type(err).__name__}: {err}", flush=True)
            continue
        print(f"ok   import {rel}", flush=True)
    try:
        _build_peft_lora_layer()
        print("ok   peft builds a LoRA layer next to this torchao", flush=True)
    except Exception as err:
        failed.append("peft-lora")
        print(f"FAIL peft LoRA layer: {type(err).__name__}: {err}", flush=True)
    if failed:
        print(f"gpu_imports: {len(failed)} failed: {' '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
