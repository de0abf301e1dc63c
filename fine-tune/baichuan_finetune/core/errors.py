"""The toolkit's errors: one base class, three kinds, and the one map from kind to exit code.

Every error the package raises on purpose derives from `ToolkitError` through one of its kinds, and
every entry point (``baichuan-finetune``, fine-tune.py, scripts/*) turns it into one line on stderr
and `exit_code(error)`. Standard library only: fine-tune.py and the CLI load it before torch.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base of every error the toolkit raises on purpose: its message is one line for the user."""


class UsageFault(ToolkitError):
    """Flags, options, config files, paths or model directories given wrong: fixed by the command line."""


class DataFault(ToolkitError):
    """Training or evaluation data that cannot be used as it is: fixed in the data."""


class RunFault(ToolkitError):
    """A run that started and could not finish (diverged, disk full, output directory in use)."""


# The one map from error kind to the process exit code (2 as argparse for usage, 1 otherwise).
EXIT_CODES: dict[type[ToolkitError], int] = {UsageFault: 2, DataFault: 1, RunFault: 1, ToolkitError: 1}


def exit_code(error: BaseException) -> int:
    """The exit code for `error`: that of the nearest kind in its class hierarchy (1 for any other error)."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


def one_line(error: BaseException) -> str:
    """The error's message on one line (its class name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__
