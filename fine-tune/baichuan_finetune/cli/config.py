"""Config files for every subcommand: ``baichuan-finetune CMD run.yaml --flag value``.

The file (YAML or JSON) is a mapping of the subcommand's option names to values; flags on the
command line override it. Unknown keys are one line with the closest known option.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any, Sequence

from ..core.config_files import CONFIG_SUFFIXES, read_config_file as read_config  # noqa: F401 (re-exported)
from ..core.config_files import ConfigFileError as ConfigError


def is_config_path(arg: str) -> bool:
    """Whether a first positional argument names a config file (by its suffix)."""
    return arg.endswith(CONFIG_SUFFIXES) and not arg.startswith("-")


def unknown_key_error(path: str, key: str, known: Sequence[str]) -> ConfigError:
    """One line for an unknown option in a config file, with the closest known name."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{path}: unknown option {key!r}{hint}")


def apply_config(parser: argparse.ArgumentParser, config: dict[str, Any], source: str) -> None:
    """Make `config`'s options the defaults of `parser` (so flags override them), each checked as if
    given as a flag (its type, its choices); `ConfigError` names `source` and the key."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    for key in config:
        if key not in actions:
            raise unknown_key_error(source, key, list(actions))
    for key, value in config.items():
        action = actions[key]
        if isinstance(value, str) and action.type is not None:  # as a flag's text: convert and check
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                raise ConfigError(f"{source}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
        action.required = False
        if not action.option_strings:  # a positional given in the file: optional on the command line
            action.nargs = "?"
        action.default = value


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where ``argv[0]`` may be a config file whose options become the
    defaults (flags after it override them)."""
    argv = list(argv)
    if argv and is_config_path(argv[0]):
        apply_config(parser, read_config(argv[0]), argv[0])
        argv = argv[1:]
    return parser.parse_args(argv)
