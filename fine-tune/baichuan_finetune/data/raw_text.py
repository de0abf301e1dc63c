"""Read raw-text documents (continued pre-training, ``--stage pt``; ``eval --perplexity``), lazily.

Formats, chosen per file by its extension:

- ``.txt``: one document per line (``txt_split="line"``), or documents separated by one or more blank
  lines (``"blank"``; the lines of a document are joined with newlines). Blank lines are separators,
  never documents.
- ``.json`` / ``.jsonl``: a JSON array of objects or JSON Lines, the document in a string field
  (``text_field``, default ``"text"``). A JSON array is parsed whole (the JSON reader has no other way);
  JSON Lines are read line by line.
- ``.parquet`` / ``.arrow``: a string column named `text_field`, read record batch by record batch
  (``.arrow``: the Arrow IPC file or stream format, as ``datasets`` writes).
- a directory: its files of these extensions, sorted by name (not recursive).

Documents are yielded as ``(id, text)`` with ids ``"<file>:<line>"`` (1-based line of a .txt document's
first line or of a JSON Lines record), ``"<file>:record <i>"`` (0-based JSON array index) or
``"<file>:row <i>"`` (0-based Parquet/Arrow row): unique, stable, and enough to find the document again.
Every problem is a `DataError` of one line naming the file, the record and the field.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .records import BadRecord, DataError

TXT_SPLITS = ("line", "blank")
TEXT_EXTENSIONS = (".txt",)
JSON_EXTENSIONS = (".json", ".jsonl")
TABLE_EXTENSIONS = (".parquet", ".arrow")
EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + TABLE_EXTENSIONS
_SNIFF_BYTES = 8192  # enough of a file to tell text from binary
_BATCH_ROWS = 1024  # Parquet/Arrow rows read at a time: memory stays flat whatever the file size
# A lone UTF-16 surrogate (an unpaired "\ud800" JSON escape) is a Python str but no Unicode text:
# sentencepiece cannot encode it. Arrow strings are UTF-8 checked already.
_SURROGATE = re.compile("[\ud800-\udfff]")


def document_files(path: str) -> list[str]:
    """The files `path` names: itself (a regular file of a known extension) or a directory's such files,
    sorted. `DataError` when it does not exist, is a pipe, has an unknown extension or holds none."""
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not found:
            raise DataError(f"{path}: directory holds no {', '.join(EXTENSIONS)} files")
        return found
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError(f"{path}: not a regular file (a pipe can be read only once and the data is read several "
                        "times): write it to a file first")
    if Path(path).suffix.lower() not in EXTENSIONS:
        raise DataError(f"{path}: unknown raw-text file type (expected {', '.join(EXTENSIONS)} or a directory)")
    return [path]


def iter_documents(path: str, text_field: str = "text", txt_split: str = "line",
                   skipped: list[BadRecord] | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(document id, text)`` for every document of `path` (a file or a directory), lazily.

    A record whose text is missing, not a string or not valid (invalid JSON, a lone surrogate) raises
    `DataError` naming file, record and field; when `skipped` is a list it is appended there instead
    (``--on_bad_record skip``) and reading goes on. File-level problems always raise: a missing,
    unreadable, empty or binary file, an unknown extension, a table without the text column. Empty
    documents (``""`` in JSON or a table) are yielded: the tokenizing step counts and drops them.
    """
    if txt_split not in TXT_SPLITS:
        raise DataError(f"txt_split {txt_split!r}: not one of {', '.join(TXT_SPLITS)}")
    for file in document_files(path):
        suffix = Path(file).suffix.lower()
        if suffix in TABLE_EXTENSIONS:
            reader = _table_documents(file, text_field, skipped)
        else:
            _check_text_file(file)
            if suffix in TEXT_EXTENSIONS:
                reader = _txt_documents(file, txt_split)
            else:
                reader = _json_documents(file, text_field, skipped)
        count = 0
        for document in reader:
            count += 1
            yield document
        if count == 0 and not (skipped and any(b.where.startswith(f"{file}:") for b in skipped)):
            raise DataError(f"{file}: empty file (no document in it)")


def _check_text_file(path: str) -> None:
    """An empty file, or one whose first bytes are not UTF-8 text (a NUL byte, invalid UTF-8), is refused
    before any of it is read as documents."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    if not head:
        raise DataError(f"{path}: empty file")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: a binary file (a NUL byte at byte {nul}), expected UTF-8 text")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: a binary file or not UTF-8 text (byte {e.start})") from None


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end) of a UTF-8 text file, read lazily."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise DataError(f"{path} line {lineno}: a NUL byte: a binary file, expected UTF-8 text")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            yield lineno, line.rstrip("\r\n")


def _txt_documents(path: str, txt_split: str) -> Iterator[tuple[str, str]]:
    if txt_split == "line":
        for lineno, line in _lines(path):
            if line.strip():
                yield f"{path}:{lineno}", line
        return
    first, block = 0, []
    for lineno, line in _lines(path):
        if line.strip():
            if not block:
                first = lineno
            block.append(line)
        elif block:
            yield f"{path}:{first}", "\n".join(block)
            block = []
    if block:
        yield f"{path}:{first}", "\n".join(block)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__)


def _bad(skipped: list[BadRecord] | None, where: str, field: str, message: str, reason: str) -> None:
    """Record a bad record in `skipped`, or raise it as one line when there is no such list."""
    bad = BadRecord(where, field, message, reason)
    if skipped is None:
        raise DataError(f"{bad} (use on_bad_record='skip' to drop such records)")
    skipped.append(bad)


def _document_text(record: Any, text_field: str) -> tuple[str | None, tuple[str, str, str] | None]:
    """The record's text, or (field, message, reason) of what is wrong with it."""
    if not isinstance(record, dict):
        return None, ("", f"record is a JSON {_json_type(record)}, expected an object with a "
                          f"{text_field!r} string", "not an object")
    if text_field not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        return None, (text_field, f"missing (the record's keys: {keys}; choose the field with --text_field)",
                      "missing text")
    text = record[text_field]
    if not isinstance(text, str):
        return None, (text_field, f"is a JSON {_json_type(text)}, expected a string", "non-string text")
    if _SURROGATE.search(text):
        return None, (text_field, "invalid Unicode: a lone surrogate (an unpaired \\u escape)", "invalid Unicode")
    return text, None


def _json_documents(path: str, text_field: str, skipped: list[BadRecord] | None) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES).decode("utf-8-sig", errors="replace").lstrip()
    if head.startswith("["):
        try:
            with open(path, encoding="utf-8-sig") as f:
                records = json.load(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply for the JSON reader") from None
        items: Iterator[tuple[str, Any]] = ((f"{path}:record {i}", r) for i, r in enumerate(records))
        for where, record in items:
            text, problem = _document_text(record, text_field)
            if problem is not None:
                _bad(skipped, where, *problem)
            else:
                yield where, text
        return
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(skipped, where, "", f"invalid JSON at column {e.colno}: {e.msg}", "invalid JSON")
            continue
        except RecursionError:
            _bad(skipped, where, "", "JSON nested too deeply for the JSON reader", "invalid JSON")
            continue
        text, problem = _document_text(record, text_field)
        if problem is not None:
            _bad(skipped, where, *problem)
        else:
            yield where, text


def _record_batches(path: str, text_field: str) -> Iterator[Any]:
    """The record batches of `text_field` of a Parquet or Arrow (IPC file or stream) file."""
    import pyarrow as pa

    try:
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            _check_column(path, parquet.schema_arrow, text_field)
            yield from parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field])
            return
        with pa.memory_map(path) as source:
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            _check_column(path, reader.schema, text_field)
            for batch in batches:
                yield batch.select([text_field])
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, pa.ArrowException) and os.path.getsize(path) > 0:
            raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
        what = "Parquet" if path.lower().endswith(".parquet") else "Arrow"
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file") from None
        raise DataError(f"{path}: not a readable {what} file ({' '.join(str(e).split())})") from None


def _check_column(path: str, schema: Any, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names[:10])}; choose one "
                        "with --text_field)")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {text_field!r} is {kind}, expected strings")


def _table_documents(path: str, text_field: str, skipped: list[BadRecord] | None) -> Iterator[tuple[str, str]]:
    row = 0
    for batch in _record_batches(path, text_field):
        for text in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            row += 1
            if text is None:
                _bad(skipped, where, text_field, "null, expected a string", "non-string text")
            else:
                yield where, text


__all__ = ["EXTENSIONS", "TXT_SPLITS", "document_files", "iter_documents"]
