"""Read conversation files of every supported format into `Conversation` records.

Supported formats, detected per file from its first object record:

- official / ShareGPT: ``{"id", "conversations": [{"from": ..., "value": ...}]}`` (``role``/``content``
  keys are accepted too), roles human/user, gpt/assistant and a leading system;
  an optional record-level ``system`` string;
- OpenAI messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``; an
  assistant message's optional ``"weight"`` (OpenAI fine-tuning): 0 = not trained, 1 = trained;
- Alpaca: ``instruction``, optional ``input``, ``output``, optional ``history`` of
  ``[user, assistant]`` pairs and optional ``system``.

A file is a JSON array of records or JSON Lines (one record per line), whatever its extension.
Every malformed record gets a message naming the file, the record (``record N``: 0-based array
index, ``line N``: 1-based JSONL line) and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from ..model.tokenization_baichuan import ASSISTANT, USER
from ..core.errors import DataFault

# Role names accepted in ShareGPT-style messages, mapped to ours. "system" is handled apart.
_SHAREGPT_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
_SHAREGPT_EXPECTED = "human, user, gpt, assistant or system"
_OPENAI_ROLES = {"user": USER, "assistant": ASSISTANT}
_OPENAI_EXPECTED = "system, user or assistant"

MAX_LISTED_PROBLEMS = 20
# Where a JSON text nested deeper than this fails to parse, its message points at the first place
# deeper than this (Python's JSON reader recurses once per level and stops near 1000).
DEEP_NESTING = 500
# A lone UTF-16 surrogate (a "\ud800" JSON escape without its pair) is a valid Python str but no
# Unicode text: sentencepiece cannot encode it (a TypeError naming no record) and UTF-8 cannot write it.
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(ValueError, DataFault):
    """Bad training data: the message lists the problems (file, record, field)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


@dataclass
class Conversation:
    """One training conversation: an optional system text and alternating-or-not turns."""

    turns: list[tuple[str, str]]  # (USER | ASSISTANT, text)
    system: str = ""
    source: str = ""  # "file line N" / "file record N", for messages and previews
    untrained_turns: tuple[int, ...] = ()  # indices into `turns` of assistant turns with "weight": 0


@dataclass
class BadRecord:
    """A record that could not be read; `reason` is a short category for counts."""

    where: str
    field: str
    message: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}" if self.field else f"{self.where}: {self.message}"


@dataclass
class ReadResult:
    """Conversations read, records skipped, and the format found in each file."""

    conversations: list[Conversation] = field(default_factory=list)
    bad_records: list[BadRecord] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format


class BadField(Exception):
    """A record's field that cannot be used; the readers turn it into a `BadRecord` naming file, record
    and field."""

    def __init__(self, field: str, message: str, reason: str):
        super().__init__(message)
        self.field, self.message, self.reason = field, message, reason


def expand_data_paths(data_path: str) -> list[str]:
    """The files `data_path` names: one file or directory, or comma-separated ones; a directory gives
    its .json/.jsonl files (sorted).

    A `data_path` that exists as a whole is one path, even with a comma in its name; only otherwise is
    it split at commas. Pipes (a ``<(...)`` process substitution, ``/dev/stdin``) are refused: the
    data is read more than once (the cache key hashes it, every rank reads it), and a pipe gives its
    content only once.
    """
    if os.path.exists(data_path):
        parts = [data_path]
    else:
        parts = [p.strip() for p in data_path.split(",")]
    paths: list[str] = []
    for part in parts:
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(str(p) for p in Path(part).iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
            if not found:
                raise DataError(f"{part}: directory holds no .json or .jsonl files")
            paths.extend(found)
        elif os.path.exists(part):
            if not stat.S_ISREG(os.stat(part).st_mode):
                raise DataError(f"{part}: not a regular file (a pipe, e.g. a <(...) process substitution, can be read "
                                "only once and the data is read several times): write it to a file first")
            paths.append(part)
        elif len(parts) > 1:
            raise DataError(f"{part}: no such file or directory (the data path {data_path!r} is not an existing "
                            "path, so it was split at commas)")
        else:
            raise DataError(f"{part}: no such file or directory")
    if not paths:
        raise DataError(f"data path {data_path!r} names no files")
    return paths


def load_items(path: str) -> list[tuple[str, Any]]:
    """(where, parsed item) for each record; an unparsable JSONL line gives a `BadField` as item."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty file")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            point = _deep_point(text)
            where = f"{path} record {point[0]}: " if point else f"{path}: "
            at = f" (more than {DEEP_NESTING} levels at line {point[1]} column {point[2]})" if point else ""
            raise DataError(f"{where}JSON nested too deeply for the JSON reader{at}") from None
        if not data:
            raise DataError(f"{path}: empty file (an empty JSON array)")
        return [(f"{path} record {i}", item) for i, item in enumerate(data)]
    items: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            if lineno == 1 and stripped[0] == "{":
                _reject_single_object(path, text)
            items.append((f"{path} line {lineno}", BadField("", f"invalid JSON at column {e.colno}: {e.msg}", "invalid JSON")))
        except RecursionError:
            point = _deep_point(line)
            at = f" (more than {DEEP_NESTING} levels at column {point[2]})" if point else ""
            items.append((f"{path} line {lineno}", BadField("", f"JSON nested too deeply for the JSON reader{at}",
                                                        "invalid JSON")))
    return items


def _deep_point(text: str) -> tuple[int, int, int] | None:
    """(record of a JSON array, line, column) where `text` first nests deeper than DEEP_NESTING levels,
    or None: where a text the JSON reader gave up on (RecursionError) is too deep."""
    depth, record, line, line_start, in_string, escaped = 0, 0, 1, 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > DEEP_NESTING:
                return record, line, i - line_start + 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 1:
            record += 1
        if ch == "\n":
            line, line_start = line + 1, i + 1
    return None


def _reject_single_object(path: str, text: str) -> None:
    """A pretty-printed single JSON object (e.g. {"train": [...], "test": [...]}) is not a record file."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return
    if isinstance(data, dict):
        keys = ", ".join(list(data)[:8])
        raise DataError(
            f"{path}: unknown format: the file is one JSON object (keys: {keys}); expected a JSON array of "
            "records or JSON Lines with one record per line"
        )


def detect_format(record: dict) -> str | None:
    """'sharegpt', 'openai', 'alpaca' or None, from a record's keys."""
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def read_file(path: str) -> ReadResult:
    """Read one file. File-level problems raise `DataError`; record problems are returned as `bad_records`."""
    result = ReadResult()
    items = load_items(path)
    fmt = next((detect_format(item) for _, item in items if isinstance(item, dict) and detect_format(item)), None)
    if fmt is None:
        first = next((item for _, item in items if isinstance(item, dict)), None)
        keys = ", ".join(list(first)[:10]) if first is not None else "no JSON object records"
        raise DataError(
            f"{path}: unknown format (first record keys: {keys}); expected records with 'conversations' "
            "(official/ShareGPT), 'messages' (OpenAI) or 'instruction' and 'output' (Alpaca)"
        )
    pair = next((where for where, item in items if isinstance(item, dict) and ("chosen" in item or "rejected" in item)),
                None)
    if pair is not None:  # supervised training would learn the prompts and ignore both answers
        raise DataError(f"{pair}: a preference pair ('chosen'/'rejected'), not a supervised conversation: "
                        "train on it with --stage dpo (docs/preference.md)")
    result.formats[path] = fmt
    parsed, result.bad_records = parse_items(items, _PARSERS[fmt])
    for where, conv in parsed:
        conv.source = where
        result.conversations.append(conv)
    return result


def parse_items(items: list[tuple[str, Any]], parse: Callable[[dict], Any]) -> tuple[list[tuple[str, Any]],
                                                                                      list[BadRecord]]:
    """``(where, parse(item))`` for each good record of `load_items`, and a `BadRecord` for each other."""
    parsed, bad = [], []
    for where, item in items:
        try:
            if isinstance(item, BadField):
                raise item
            if not isinstance(item, dict):
                raise BadField("", f"record is a JSON {_json_type(item)}, expected an object", "not an object")
            parsed.append((where, parse(item)))
        except BadField as b:
            bad.append(BadRecord(where, b.field, b.message, b.reason))
    return parsed, bad


def read_records(data_path: str, on_bad_record: Literal["error", "skip"] = "error",
                 what: str = "training data") -> ReadResult:
    """Read every file named by `data_path` (file, comma-separated files or directory).

    With ``on_bad_record="error"`` any bad record raises one `DataError` listing the first 20 problems and
    their count; with ``"skip"`` they are dropped and returned in `bad_records` (counted by reason).
    `what` names the data in that message ("training data", "eval data").
    """
    result = ReadResult()
    for path in expand_data_paths(data_path):
        part = read_file(path)
        result.conversations.extend(part.conversations)
        result.bad_records.extend(part.bad_records)
        result.formats.update(part.formats)
    if result.bad_records and on_bad_record == "error":
        raise bad_records_error(result.bad_records, what)
    return result


def bad_records_error(bad: list[BadRecord], what: str = "training data", can_skip: bool = True) -> DataError:
    """One `DataError` listing the first MAX_LISTED_PROBLEMS problems and their count; a single problem
    is one line. `can_skip`: the reader offers ``on_bad_record='skip'``, so the message suggests it."""
    problems = [str(b) for b in bad]
    if len(problems) == 1:
        hint = " (use on_bad_record='skip' to drop it)" if can_skip else ""
        return DataError(f"1 bad record in the {what}: {problems[0]}{hint}", problems)
    lines = problems[:MAX_LISTED_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(lines)} more" if len(problems) > len(lines) else ""
    hint = " (use on_bad_record='skip' to drop them)" if can_skip else ""
    msg = (
        f"{len(problems)} bad record(s) in the {what}{hint}:\n  "
        + "\n  ".join(lines)
        + more
    )
    return DataError(msg, problems)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def text_value(value: Any, field: str, required: bool = True) -> str:
    """`value` as text (None is "" unless `required`); `BadField` naming `field` for anything else or
    for invalid Unicode."""
    if isinstance(value, str):
        if (bad := _SURROGATE.search(value)) is not None:
            raise BadField(field, f"invalid Unicode: lone surrogate U+{ord(bad.group()):04X} at character {bad.start()} "
                              "(an unpaired \\u escape)", "invalid Unicode")
        return value
    if value is None and not required:
        return ""
    if value is None:
        raise BadField(field, "missing text", "missing or non-string text")
    raise BadField(field, f"text is a JSON {_json_type(value)}, expected a string", "missing or non-string text")


def _parse_messages(record: dict, key: str, roles: dict[str, str], expected: str) -> Conversation:
    messages = record.get(key)
    if not isinstance(messages, list):
        if messages is None:
            raise BadField(key, "missing conversation field", "no conversation field")
        raise BadField(key, f"is a JSON {_json_type(messages)}, expected an array of messages", "no conversation field")
    if not messages:
        raise BadField(key, "empty conversation", "empty conversation")
    system = text_value(record.get("system"), "system", required=False)
    has_system_field = "system" in record and record.get("system") is not None
    turns: list[tuple[str, str]] = []
    untrained: list[int] = []  # turns with "weight": 0
    for i, msg in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise BadField(where, f"message is a JSON {_json_type(msg)}, expected an object", "not an object")
        role_key = "from" if "from" in msg else "role"
        text_key = "value" if "value" in msg else "content" if "content" in msg else (
            "value" if role_key == "from" else "content")
        role = msg.get(role_key)
        if not isinstance(role, str):
            raise BadField(f"{where}.{role_key}", "missing role" if role is None else f"role is a JSON {_json_type(role)}",
                       "unknown role")
        text = text_value(msg.get(text_key), f"{where}.{text_key}")
        if role == "system":
            if i != 0:
                raise BadField(f"{where}.{role_key}", "system message not in first place", "system not first")
            if has_system_field:
                raise BadField(f"{where}.{role_key}", "both a 'system' field and a system message", "system not first")
            system = text
            continue
        if role not in roles:
            raise BadField(f"{where}.{role_key}", f"unknown role {role!r} (expected {expected})", "unknown role")
        if "weight" in msg and not _trained(msg["weight"], roles[role], f"{where}.weight"):
            untrained.append(len(turns))
        turns.append((roles[role], text))
    if not turns:
        raise BadField(key, "empty conversation (only a system message)", "empty conversation")
    return Conversation(turns=turns, system=system, untrained_turns=tuple(untrained))


def _trained(weight: Any, role: str, field: str) -> bool:
    """OpenAI fine-tuning's per-message ``weight``: 1 trains an assistant message, 0 does not;
    anything else (or a weight on another role) is bad data rather than a guess."""
    if role != ASSISTANT:
        raise BadField(field, "only assistant messages have a weight", "bad weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        shown = json.dumps(weight) if not isinstance(weight, float) or math.isfinite(weight) else repr(weight)
        raise BadField(field, f"weight {shown}: expected 0 (not trained) or 1 (trained)", "bad weight")
    return weight == 1


def _parse_sharegpt(record: dict) -> Conversation:
    return _parse_messages(record, "conversations", _SHAREGPT_ROLES, _SHAREGPT_EXPECTED)


def _parse_openai(record: dict) -> Conversation:
    return _parse_messages(record, "messages", _OPENAI_ROLES, _OPENAI_EXPECTED)


def _parse_alpaca(record: dict) -> Conversation:
    if "instruction" not in record or "output" not in record:
        missing = "instruction" if "instruction" not in record else "output"
        raise BadField(missing, "missing conversation field", "no conversation field")
    instruction = text_value(record["instruction"], "instruction")
    extra = text_value(record.get("input"), "input", required=False)
    output = text_value(record["output"], "output")
    system = text_value(record.get("system"), "system", required=False)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadField("history", f"is a JSON {_json_type(history)}, expected an array of [user, assistant] pairs",
                   "bad history")
    turns: list[tuple[str, str]] = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise BadField(f"history[{i}]", "expected a [user, assistant] pair", "bad history")
        turns.append((USER, text_value(pair[0], f"history[{i}][0]")))
        turns.append((ASSISTANT, text_value(pair[1], f"history[{i}][1]")))
    turns.append((USER, f"{instruction}\n{extra}" if extra else instruction))
    turns.append((ASSISTANT, output))
    return Conversation(turns=turns, system=system)


_PARSERS = {"sharegpt": _parse_sharegpt, "openai": _parse_openai, "alpaca": _parse_alpaca}


def parse_record(record: Any, fmt: str, where: str) -> Conversation | BadRecord:
    """One parsed JSON record of a file whose format (`detect_format`) is `fmt`: its `Conversation`, or a
    `BadRecord` saying what is wrong with it. For readers that take records one at a time (--streaming)."""
    parsed, bad = parse_items([(where, record)], _PARSERS[fmt])
    if bad:
        return bad[0]
    conversation = parsed[0][1]
    conversation.source = where
    return conversation
