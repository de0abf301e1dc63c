"""The one reader of "a JSON object from a file, or why not" (configs, adapter configs, fingerprints,
DeepSpeed configs, subject mappings). Standard library only.

Callers turn `JSONObjectError` into their own error type (flag or file named their way); its
`reason` is one line without the path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class JSONObjectError(ValueError):
    """A file that holds no JSON object: `path`, `reason` (one line, no path) and the `cause` (the
    OSError or decoding error; None when the file is valid JSON of another type)."""

    def __init__(self, path: str | os.PathLike, reason: str, cause: BaseException | None = None):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.cause = cause


def read_json_object(path: str | os.PathLike, of: str = "", encoding: str = "utf-8") -> dict:
    """The JSON object in `path`; `JSONObjectError` when it cannot be read, is not JSON, or is JSON of
    another type. `of` describes the object in that last message (``" of DeepSpeed options"``)."""
    try:
        text = Path(path).read_text(encoding=encoding)
    except OSError as e:
        raise JSONObjectError(path, f"cannot read: {e.strerror or e}", e) from None
    except UnicodeDecodeError as e:
        raise JSONObjectError(path, f"not valid JSON: {' '.join(str(e).split())}", e) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, pathological nesting
        raise JSONObjectError(path, f"not valid JSON: {' '.join(str(e).split()) or 'nested too deeply'}", e) from None
    if not isinstance(data, dict):
        raise JSONObjectError(path, f"expected a JSON object{of}, found {type(data).__name__}")
    return data
