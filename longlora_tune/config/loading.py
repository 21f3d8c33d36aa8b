"""Reading a recipe's config from its command line, as torchtune does, with one-line errors.

torchtune's ``config.parse`` lets a YAML syntax error, a missing config file or a malformed override out
as a traceback (49 lines for a YAML error). :func:`load_config` reads the config with that same parser
(file, ``key=value`` overrides, ``~key`` removal, ``section=path`` for a ``_component_``), checks that its
``${...}`` interpolations resolve, and turns every failure into one
:class:`~longlora_tune.errors.LongLoRAConfigError`. :func:`parse` is the recipes' replacement for
``@config.parse``; the ``tune run`` launcher (:mod:`longlora_tune.config.preflight`) and
``python -m longlora_tune.config.check`` read configs through :func:`load_config` too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, NoReturn, Optional

import yaml
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from longlora_tune.config.validation import check_resolvable
from longlora_tune.errors import LongLoRAConfigError, config_error_once_per_node


def _read_error(error: Exception, recipe_args: Sequence[str]) -> str:
    """The one-line message for a config that could not be read (what, where and the fix)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        context = f" ({error.context})" if error.context else ""
        return (
            f"{mark.name}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {error.problem}{context}; "
            "fix the file at that line"
        )
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return (
            f"config file not found: {error.filename}; give a config name that `tune ls` lists or the path "
            "of a YAML file"
        )
    if isinstance(error, OmegaConfBaseException) and getattr(error, "full_key", None):
        # OmegaConf appends "full_key: ... object_type=..." lines; the key leads instead.
        reason = str(error).strip().splitlines()[0]
        return f"cannot read the config: {error.full_key}: {reason}; fix that value (interpolation: ${{key}})"
    reason = " ".join(str(error).split()) or type(error).__name__
    return f"cannot read the config ({' '.join(recipe_args)}): {reason}"


def load_config(recipe_args: Sequence[str], *, description: Optional[str] = None) -> DictConfig:
    """The config a recipe gets from ``--config <file> key=value ...``, parsed as torchtune parses it.

    Args:
        recipe_args: the recipe's arguments (``--config`` path and overrides).
        description: the recipe's ``--help`` text.

    Returns:
        The merged config (unresolved, as torchtune hands it to a recipe).

    Raises:
        LongLoRAConfigError: when the file is missing or not valid YAML, an override is malformed, or an
            interpolation does not resolve.
        SystemExit: for ``--help`` and argparse usage errors (argparse printed them).
    """
    from torchtune import config

    captured: list[DictConfig] = []

    def _capture(cfg: DictConfig) -> int:
        captured.append(cfg)
        return 0

    _capture.__doc__ = description  # what config.parse shows for --help
    # torchtune's own parser, exactly as @config.parse runs it; it reads sys.argv and ends with sys.exit.
    parsed = config.parse(_capture)
    argv = sys.argv
    sys.argv = ["recipe", *recipe_args]
    try:
        parsed()
    except SystemExit:
        if not captured:
            raise  # argparse already printed its usage error (or the --help text)
    except Exception as e:  # YAML syntax, a missing file, an override without "=" ...
        raise LongLoRAConfigError(_read_error(e, recipe_args)) from e
    finally:
        sys.argv = argv
    check_resolvable(captured[0])
    return captured[0]


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[[], NoReturn]:
    """``@config.parse`` for a recipe's ``recipe_main``, reading the config with :func:`load_config`.

    Under torchrun only local rank 0 reports a config that cannot be read, so the line is printed once per
    node (:func:`~longlora_tune.errors.config_error_once_per_node`). Put ``@report_errors`` above it.

    Args:
        recipe_main: the recipe's main function, taking the config.

    Returns:
        A function of no arguments that reads ``sys.argv[1:]``, calls ``recipe_main`` and exits with what
        it returns (as ``@config.parse`` does).
    """

    @wraps(recipe_main)
    def wrapper() -> NoReturn:
        cfg = config_error_once_per_node(lambda: load_config(sys.argv[1:], description=recipe_main.__doc__))
        sys.exit(recipe_main(cfg))

    return wrapper
