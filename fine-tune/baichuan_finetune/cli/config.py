"""Config files for every subcommand: ``baichuan-finetune CMD run.yaml --flag value``.

The file (YAML or JSON) is a mapping of the subcommand's option names to values; flags on the
command line override it. Unknown keys are one line with the closest known option.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import UsageFault

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(UsageFault):
    """A config file that cannot be read, is not a mapping, or names an unknown option."""


def is_config_path(arg: str) -> bool:
    """Whether a first positional argument names a config file (by its suffix)."""
    return arg.endswith(CONFIG_SUFFIXES) and not arg.startswith("-")


def read_config(path: str) -> dict[str, Any]:
    """The option mapping in a ``.json``/``.yaml``/``.yml`` file; `ConfigError` (one line) otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    try:
        if path.endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise ConfigError(f"{path}: not valid {kind}: {' '.join(str(e).split())}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in config.items()}


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
