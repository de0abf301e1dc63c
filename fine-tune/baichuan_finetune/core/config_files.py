"""Config files: a YAML or JSON mapping of option names to values, read in one place for training
(`options.arguments`) and every subcommand (`cli.config`). Standard library and PyYAML only, so the
torch-free subcommands (``plan``) can read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UsageFault

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigFileError(UsageFault):
    """A config file that cannot be read, is not valid YAML/JSON, is not a mapping, or names an unknown option."""


def read_config_file(path: str) -> dict[str, Any]:
    """The option mapping in a ``.json``/``.yaml``/``.yml`` file, with ``-`` in names read as ``_``
    (as on the command line); an empty file is an empty mapping. `ConfigFileError` (one line) otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigFileError(f"{path}: cannot read config file: {reason}") from None
    try:
        if path.endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise ConfigFileError(f"{path}: not valid {kind}: {' '.join(str(e).split())}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigFileError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in config.items()}
