"""Errors that longlora_tune recipes report as one line instead of a traceback.

Every recipe's ``recipe_main`` catches these, prints ``longlora_tune: error: <message>`` to stderr and exits
with a non-zero code, so a wrong path or an inconsistent config reads like a command-line error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

#: Exit code for a bad config or missing files (the argparse convention for usage errors).
CONFIG_ERROR_EXIT_CODE = 2
#: Exit code for a run stopped because the loss or the weights stopped being finite.
DIVERGED_EXIT_CODE = 3


class LongLoRAConfigError(ValueError):
    """A bad config value or a missing file; the message names the value/path and the fix."""


class TrainingDivergedError(RuntimeError):
    """The loss, gradient norm or weights became NaN/inf; the run stopped without saving that state."""


_F = TypeVar("_F", bound=Callable[..., Any])


def report_errors(fn: _F) -> _F:
    """Decorate a ``recipe_main`` so LongLoRA errors end the process with one line and an exit code.

    ``LongLoRAConfigError`` exits with code 2 and ``TrainingDivergedError`` with code 3, each after printing
    ``longlora_tune: error: <message>`` to stderr; other exceptions propagate unchanged (with traceback).

    Args:
        fn: the function to wrap (usually ``recipe_main``; put this decorator *above* ``@config.parse``).

    Returns:
        The wrapped function.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LongLoRAConfigError as e:
            _exit_with(e, CONFIG_ERROR_EXIT_CODE)
        except TrainingDivergedError as e:
            _exit_with(e, DIVERGED_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


def _exit_with(error: Exception, code: int) -> None:
    message = " ".join(str(error).split("\n"))
    print(f"longlora_tune: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
