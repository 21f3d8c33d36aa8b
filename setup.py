"""Build hook: ship ``longlora_tune_hook.pth`` at the root of site-packages.

All metadata lives in pyproject.toml. The only thing pyproject cannot express is a file at the top of
site-packages: the ``.pth`` that imports ``_longlora_tune_hook`` at start-up so that the stock ``tune``
CLI learns our recipe names (see longlora_tune/_tune_registry.py). ``build_py`` writes it into the
wheel root for normal wheels, and into the editable wheel's root for ``pip install -e .`` (PEP 660),
where ``build_py`` runs with ``editable_mode`` and the wheel contents are staged in the ``install``
command's ``install_lib``.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "longlora_tune_hook.pth"
# Sorts after setuptools' "__editable__.*.pth", whose finder must exist before this import in -e installs.
PTH_LINE = "import _longlora_tune_hook\n"


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the start-up ``.pth`` file next to the top-level modules."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
