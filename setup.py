"""Build hook: ship the start-up ``.pth`` and the top-level ``recipes/`` and ``configs/`` folders.

All metadata lives in pyproject.toml. Two things pyproject cannot express:

* ``longlora_tune_hook.pth`` at the top of site-packages: it imports ``_longlora_tune_hook`` at start-up
  so that the stock ``tune`` CLI learns our recipe names (see longlora_tune/config/tune_registry.py). It is
  written into the wheel root for normal wheels, and into the editable wheel's root for
  ``pip install -e .`` (PEP 660), where ``build_py`` runs with ``editable_mode`` and the wheel contents are
  staged in the ``install`` command's ``install_lib``.
* The repository keeps ``recipes/`` and ``configs/`` at the top level (torchtune's layout, and what
  ``tune cp`` users copy), but torchtune's wheel already owns the importable name ``recipes``: a normal
  wheel therefore carries them as data inside the package (``longlora_tune/recipes``,
  ``longlora_tune/configs``). Editable installs read them in place (``longlora_tune.resources``).
"""

import fnmatch
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "longlora_tune_hook.pth"
# Sorts after setuptools' "__editable__.*.pth", whose finder must exist before this import in -e installs.
PTH_LINE = "import _longlora_tune_hook\n"
#: Top-level folder -> the file pattern shipped from it.
BUNDLED = {"recipes": "*.py", "configs": "*.yaml"}


def _copy_bundled(src: str, dest: str, pattern: str) -> None:
    """Copy the files of ``src`` matching ``pattern`` (recursively) to ``dest``, replacing it."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    for dirpath, dirnames, files in os.walk(src):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in fnmatch.filter(files, pattern):
            target = os.path.join(dest, os.path.relpath(dirpath, src))
            os.makedirs(target, exist_ok=True)
            shutil.copy2(os.path.join(dirpath, name), target)


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the start-up ``.pth`` and bundles ``recipes/`` and ``configs/``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
            for folder, pattern in BUNDLED.items():
                _copy_bundled(folder, os.path.join(self.build_lib, "longlora_tune", folder), pattern)
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
            for folder in BUNDLED:
                root = os.path.join(self.build_lib, "longlora_tune", folder)
                for dirpath, _, files in os.walk(root):
                    outputs.extend(os.path.join(dirpath, f) for f in files)
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
