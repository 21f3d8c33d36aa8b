"""Check a training config without training: ``python -m longlora_tune.config.check``.

    python -m longlora_tune.config.check --config NAME [--nproc_per_node N] [--nnodes M] [key=value ...]

``NAME`` is what ``tune run longlora_distributed --config NAME`` takes: a config name (``tune ls`` lists
them) or a YAML file; overrides are ``tune run``'s. The config is read as the recipe reads it
(:func:`~longlora_tune.config.loading.load_config`) and checked by the function the recipe and the
``tune run`` launcher run before anything else (:func:`~longlora_tune.config.validation.validate_config`),
for the world size ``--nproc_per_node`` x ``--nnodes`` gives (1 by default, as ``tune run`` without
torchrun flags). It prints one line, ``config OK: NAME: <derived settings>`` (training length, S² group,
RoPE, LoRA, ranks and batch, run length), exit code 0, or the recipe's one-line
``longlora_tune: error: ...``, exit code 2. Nothing is written: no output folder, no data cache; of the
base model only ``config.json`` is read (and which weight and tokenizer files exist).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from longlora_tune.config.loading import load_config
from longlora_tune.config.preflight import torchrun_world_size
from longlora_tune.config.tune_registry import DEFAULT_RECIPE, config_file
from longlora_tune.config.validation import validate_config
from longlora_tune.errors import LongLoRAConfigError, report_errors


def check(config: str, overrides: list[str], nproc_per_node: str = "1", nnodes: str = "1") -> str:
    """Read and check a training config as ``tune run`` would run it; return the ``config OK`` line.

    Args:
        config: a config name or YAML file (``--config``).
        overrides: ``key=value`` overrides.
        nproc_per_node: torchrun's ``--nproc_per_node`` the run will use.
        nnodes: torchrun's ``--nnodes`` the run will use.

    Returns:
        ``config OK: <config>: <derived settings> (assumed: ...)``.

    Raises:
        LongLoRAConfigError: when the config cannot be read, fails a check, or the world size is not fixed.
    """
    world_size = torchrun_world_size(nproc_per_node, nnodes)
    if world_size is None:
        raise LongLoRAConfigError(
            f"--nproc_per_node {nproc_per_node} --nnodes {nnodes} gives no fixed number of ranks; "
            "give the numbers the run will use"
        )
    cfg = load_config(["--config", config_file(config, DEFAULT_RECIPE), *overrides])
    checked = validate_config(cfg, world_size)
    assumed = f"assumed: --nproc_per_node {nproc_per_node} --nnodes {nnodes}"
    return f"config OK: {config}: {checked.summary()} ({assumed})"


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point (see the module docstring).

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        0 when the config passes; a failing config exits with code 2 after its one-line error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m longlora_tune.config.check",
        description="Run every check longlora_distributed runs before training, and print what it derived.",
    )
    parser.add_argument(
        "--config", required=True, help="config name (as `tune ls` lists it) or YAML file path"
    )
    parser.add_argument(
        "--nproc_per_node", default="1", help="processes per node the run will use (default 1)"
    )
    parser.add_argument("--nnodes", default="1", help="nodes the run will use (default 1)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (as for tune run)")
    args = parser.parse_args(argv)
    print(report_errors(check)(args.config, args.overrides, args.nproc_per_node, args.nnodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
