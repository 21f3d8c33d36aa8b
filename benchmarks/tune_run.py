"""``tune run`` in a child process, as a user types it, from a checkout.

The benchmarks are not in the wheel and the GPU machine has no installed ``longlora_tune``: the child gets
the repository on ``PYTHONPATH`` and imports the start-up hook itself (``_longlora_tune_hook``, what the
installed ``.pth`` file does), so ``tune run longlora_distributed`` finds our recipes either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

__all__ = ["tune_command", "tune_run"]

REPO = Path(__file__).resolve().parents[1]
# torchtune's ``tune`` entry point with our start-up hook imported (the installed .pth file does that).
_TUNE_MAIN = "import sys, _longlora_tune_hook; from torchtune._cli.tune import main; sys.exit(main())"


def tune_command(*args: str) -> list[str]:
    """The command line of ``tune ARGS``, also where the package is not pip-installed (no .pth file).

    Args:
        args: ``tune``'s arguments, e.g. ``"run", "--nproc_per_node", "2", "longlora_distributed"``.

    Returns:
        The argv for ``subprocess``; the child needs the repository on ``PYTHONPATH``.
    """
    return [sys.executable, "-c", _TUNE_MAIN, *args]


def tune_run(
    recipe: str, config: str, overrides: Sequence[str], *, timeout: Optional[float] = None
) -> subprocess.CompletedProcess[str]:
    """Run ``tune run <recipe> --config <config> <overrides>`` and capture its output.

    Args:
        recipe: A recipe name (``longlora_distributed``).
        config: A config name or path.
        overrides: ``key=value`` overrides.
        timeout: Seconds before the child is killed (None: no limit).

    Returns:
        The finished process (``returncode``, ``stdout``, ``stderr``).
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = tune_command("run", recipe, "--config", config, *overrides)
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
