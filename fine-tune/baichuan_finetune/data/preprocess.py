"""Tokenize training data once, cache it, and hand the trainer datasets plus a collator.

`prepare_data` is the one entry point. The tokenized (and split, and packed) data is cached under a
key made of the bytes of every data file, the tokenizer model, `model_max_length` and the options, so
a second run with the same inputs only memory-maps Arrow files. In a distributed run one process per
node (local rank 0) tokenizes; the others poll for the cache's completion marker with no timeout (not
a torch.distributed barrier, which would time out on a large dataset) and then read it.

Every use checks the cache: the completion marker records each file's row count, size and sha256,
and an entry that does not match (truncated, garbled, missing, an empty marker, a file in its place)
is reported in one line and rebuilt. SIGTERM and SIGINT while preparing kill the worker processes and
remove the temporary directory before the signal takes its usual effect; temporary directories of
a killed run (SIGKILL) are removed by the next run on the same host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
from datasets import Dataset

from .collator import DataCollator, pack_arrays
from .data_stats import DataReport, length_percentiles, padding_efficiency
from .encoding import EncodedChunk, encode_conversations
from .mixing import Source, mix_order, parse_data_sources, source_files
from ..core.processes import pid_running
from ..model.modeling_baichuan import IGNORE_INDEX
from .pretrain import encode_documents, pack_documents
from .raw_text import iter_documents
from .records import BadRecord, Conversation, DataError, bad_records_error, read_records
from ..model.tokenization_baichuan import PlainTextEncoder

# Bump when the encoding rule or the stored layout changes (2: per-file rows and sha256; 3: sources, pt).
CACHE_FORMAT = 3
DONE_FILE = "done.json"
ARROW_FILES = ("train.arrow", "eval.arrow")
CHUNK_SIZE = 2000  # conversations per tokenizing task
MIN_PER_WORKER = 5000  # below this a pool costs more than it saves
# A temporary or set-aside entry: <key>.tmp-<host>-<pid>-<hex> (before the host was added: <key>.tmp-<pid>-<hex>).
_LEFTOVER = re.compile(r"^[0-9a-f]{32}\.(?:tmp|stale)-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")

logger = logging.getLogger(__name__)


class DataOptions(Protocol):
    """The data options prepare_data reads: `arguments.DataArguments`, already checked there."""

    data_path: str
    eval_data_path: str | None
    val_size: float
    on_bad_record: Literal["error", "skip"]
    padding: Literal["longest", "max_length"]
    packing: bool
    truncation: Literal["head", "rounds"]
    preprocessing_num_workers: int | None
    data_cache_dir: str | None
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"]
    mix_seed: int | None
    text_field: str
    txt_split: Literal["line", "blank"]
    pt_cross_document: bool


@dataclass
class PreparedData:
    """What training needs of the data: datasets, the collator that batches them, and the report."""

    train_dataset: Dataset
    eval_dataset: Dataset | None
    data_collator: DataCollator
    report: DataReport


def default_cache_dir() -> str:
    """$BAICHUAN_FINETUNE_CACHE, or ~/.cache/baichuan_finetune/data."""
    return os.environ.get("BAICHUAN_FINETUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "baichuan_finetune", "data"
    )


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None


def mix_seed(data_args: DataOptions, seed: int) -> int:
    """The seed of the interleaving draws: ``--mix_seed``, else the run's seed."""
    chosen = getattr(data_args, "mix_seed", None)  # options objects of callers that predate mixing have none
    return seed if chosen is None else chosen


def cache_key(data_args: DataOptions, sp: Any, model_max_length: int, seed: int, stage: str = "sft") -> str:
    """Hash of everything the prepared data depends on (file contents, not names or dates)."""
    h = hashlib.sha256()
    options = {
        "format": CACHE_FORMAT,
        "stage": stage,
        "model_max_length": model_max_length,
        "on_bad_record": data_args.on_bad_record,
        "val_size": data_args.val_size if not data_args.eval_data_path else 0,
        "seed": seed,
        "mix_strategy": data_args.mix_strategy,
        "mix_seed": mix_seed(data_args, seed),
    }
    if stage == "pt":
        options.update(text_field=data_args.text_field, txt_split=data_args.txt_split,
                       pt_cross_document=data_args.pt_cross_document)
    else:
        options.update(truncation=data_args.truncation, packing=data_args.packing)
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(hashlib.sha256(sp.serialized_model_proto()).digest())
    for name, spec in (("train", data_args.data_path), ("eval", data_args.eval_data_path)):
        if spec:
            h.update(name.encode())
            for source in parse_data_sources(spec):
                h.update(f"source {source.weight}".encode())
                for path in source_files(source.path, stage):
                    h.update(_file_digest(path).encode())
    return h.hexdigest()[:32]


def prepare_data(
    data_args: DataOptions,
    tokenizer: Any,
    model_max_length: int,
    seed: int = 42,
    is_main_process_on_node: bool | None = None,
    stage: str = "sft",
) -> PreparedData:
    """Read, validate, tokenize (or load from cache), split and optionally pack the data.

    The sources of ``data_path`` are mixed by ``mix_strategy`` (`mixing.mix_order`). ``stage="pt"``
    reads raw-text documents instead of conversations (`raw_text`), every token a target, always
    packed into rows of `model_max_length` (`pretrain`).

    `tokenizer` is a `BaichuanTokenizer` (or anything with its ``sp_model``) or a sentencepiece
    processor. The options are taken as given: `arguments.DataArguments` checks them. Raises
    `DataError` (before any training) on bad data in "error" mode, on files it cannot read or whose
    format it does not know, when no example is left, and when the cache directory cannot be written.
    A cache entry that fails its check is reported (one warning line) and rebuilt. SIGTERM or SIGINT
    meanwhile leaves no partial entry and is then handled as it would have been without us (see
    `_signals_unwind`). `is_main_process_on_node` defaults to ``LOCAL_RANK`` being unset or 0.
    """
    if is_main_process_on_node is None:
        is_main_process_on_node = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    sp = getattr(tokenizer, "sp_model", tokenizer)
    root = Path(data_args.data_cache_dir or default_cache_dir())
    key = cache_key(data_args, sp, model_max_length, seed, stage)
    entry = root / key
    with _signals_unwind():
        if is_main_process_on_node:
            _make_root(root)
            _remove_leftovers(root)
            cached, from_cache = _use_entry(entry), True
            if cached is None:
                _build_entry(entry, data_args, sp, model_max_length, seed, stage)
                cached, from_cache = _open_just_built(entry), False
        else:
            cached, from_cache = _wait_for_entry(entry), True
    report, train, eval_ds = cached
    report.from_cache, report.cache_dir = from_cache, str(entry)
    collator = DataCollator(model_max_length=model_max_length, padding=data_args.padding)
    return PreparedData(train_dataset=train, eval_dataset=eval_ds, data_collator=collator, report=report)


class _BadCache(Exception):
    """A cache entry that cannot be used; the message says what is wrong and with which file."""


_Cached = tuple[DataReport, Dataset, "Dataset | None"]


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"data cache directory {root}: not a directory (--data_cache_dir, "
                        "$BAICHUAN_FINETUNE_CACHE)") from None
    except OSError as e:
        raise DataError(f"data cache directory {root}: cannot create it: {e.strerror or e}") from None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _arrow_rows(path: Path) -> int | None:
    """Rows of an Arrow stream file, or None when it is not one (garbled, cut inside a batch)."""
    try:
        with pa.memory_map(str(path)) as source:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    except (pa.ArrowException, OSError, ValueError):
        return None


def _file_record(path: Path, rows: int) -> dict[str, Any]:
    """What done.json records of one finished file (written by us, checked on every use)."""
    return {"rows": rows, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _read_done(entry: Path) -> str | None:
    try:
        return (entry / DONE_FILE).read_text()
    except (OSError, UnicodeDecodeError):  # absent, not a directory, unreadable: not (yet) usable
        return None


def _open_entry(entry: Path) -> _Cached:
    """The report and datasets of a finished entry, after checking every file against done.json.

    Raises `_BadCache` naming the file on any difference: a truncated file (even one cut at a record
    batch boundary, which is still a valid Arrow stream with fewer rows), a garbled or missing file,
    an empty or invalid done.json, or something other than a directory in the entry's place.
    """
    if not entry.is_dir() or entry.is_symlink():
        raise _BadCache(f"{entry}: not a directory")
    done = entry / DONE_FILE
    text = _read_done(entry)
    if text is None:
        raise _BadCache(f"{done}: missing or unreadable")
    if not text.strip():
        raise _BadCache(f"{done}: empty")
    try:
        meta = json.loads(text)
        files = meta["files"]
        report = DataReport.from_dict(meta["report"])
        if meta["format"] != CACHE_FORMAT or "train.arrow" not in files or not set(files) <= set(ARROW_FILES):
            raise ValueError
        expected = {name: (int(r["rows"]), int(r["bytes"]), str(r["sha256"])) for name, r in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _BadCache(f"{done}: not a valid completion marker") from None
    datasets: dict[str, Dataset] = {}
    for name, (rows, size, digest) in expected.items():
        path = entry / name
        try:
            actual_size = path.stat().st_size
        except OSError:
            raise _BadCache(f"{path}: missing") from None
        actual_rows = _arrow_rows(path)
        if actual_rows is None:
            raise _BadCache(f"{path}: not a readable Arrow stream ({actual_size} bytes, done.json records {size})")
        if actual_rows != rows:
            raise _BadCache(f"{path}: {actual_rows} rows, done.json records {rows}")
        if actual_size != size:
            raise _BadCache(f"{path}: {actual_size} bytes, done.json records {size}")
        try:
            if _sha256(path) != digest:  # checked before any other reader maps the bytes
                raise _BadCache(f"{path}: sha256 differs from done.json")
            datasets[name] = Dataset.from_file(str(path))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _BadCache(f"{path}: unreadable ({e})") from None
        if len(datasets[name]) != rows:  # what training will see, not only what the stream holds
            raise _BadCache(f"{path}: {len(datasets[name])} rows, done.json records {rows}")
    return report, datasets["train.arrow"], datasets.get("eval.arrow")


def _use_entry(entry: Path) -> _Cached | None:
    """The checked entry, or None when there is none or it failed its check (reported and set aside)."""
    if not (entry.exists() or entry.is_symlink()):
        return None
    seen = _read_done(entry)
    try:
        return _open_entry(entry)
    except _BadCache as e:
        logger.warning("data cache %s; rebuilding it", e)
        if _read_done(entry) == seen:  # not replaced meanwhile by another node sharing the cache
            _set_aside(entry)
        return None


def _open_just_built(entry: Path) -> _Cached:
    try:
        return _open_entry(entry)
    except _BadCache as e:  # changed under us (another node's build took its place, or a disk fault)
        raise DataError(f"data cache {e}, just after it was written") from None


def _leftover_name(entry: Path, kind: str) -> Path:
    # The host keeps a run on one node from removing another node's work on a shared file system.
    return entry.with_name(f"{entry.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _set_aside(entry: Path) -> None:
    """Remove a bad entry; renamed away first, so a waiting rank never sees it half deleted."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            aside = _leftover_name(entry, "stale")
            os.rename(entry, aside)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            entry.unlink()
    except FileNotFoundError:  # another node's main process was first
        pass
    except OSError as e:
        raise DataError(f"data cache {entry}: cannot remove the bad entry: {e.strerror or e}") from None


def _remove_leftovers(root: Path) -> None:
    """Remove temporary and set-aside entries whose process (on this host) is gone: a SIGKILLed run."""
    host = socket.gethostname()
    for path in root.iterdir():
        m = _LEFTOVER.match(path.name)
        if not m or (m["host"] is not None and m["host"] != host) or pid_running(int(m["pid"])):
            continue
        logger.info("data cache: removing %s, left by a killed run", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _error_marker(entry: Path) -> Path:
    return entry.with_name(entry.name + ".error")


def _wait_for_entry(entry: Path, poll_s: float = 1.0) -> _Cached:
    # No timeout on purpose: tokenizing a large dataset may take longer than any fixed limit, and a
    # failing main process either writes the error marker (bad data) or is killed with the job.
    # An entry that fails its check is being replaced by the main process: wait for another done.json
    # (each build writes a fresh id into it) instead of reading the bad one again.
    marker = _error_marker(entry)
    rejected = None
    while True:
        text = _read_done(entry)
        if text is not None and text != rejected:
            try:
                return _open_entry(entry)
            except _BadCache:
                rejected = text
        if marker.exists():
            raise DataError(marker.read_text())
        if entry.parent.exists() and not entry.parent.is_dir():
            raise DataError(f"data cache directory {entry.parent}: not a directory (--data_cache_dir, "
                            "$BAICHUAN_FINETUNE_CACHE)")
        time.sleep(poll_s)


def _build_entry(entry: Path, data_args: DataOptions, sp: Any, model_max_length: int, seed: int,
                 stage: str = "sft") -> None:
    marker = _error_marker(entry)
    marker.unlink(missing_ok=True)
    tmp = _leftover_name(entry, "tmp")
    try:
        try:
            tmp.mkdir()
            report, rows = _tokenize_to(tmp, data_args, sp, model_max_length, seed, stage)
            files = {name: _file_record(tmp / name, n) for name, n in rows.items()}
            done = {"format": CACHE_FORMAT, "build": uuid.uuid4().hex, "files": files, "report": report.to_dict()}
            # The completion marker is written last, then the whole directory appears at once by rename.
            (tmp / DONE_FILE).write_text(json.dumps(done))
            try:
                os.rename(tmp, entry)
            except OSError:
                if _read_done(entry) is None:  # another node finished first otherwise
                    raise
        except OSError as e:  # a full disk, a read-only cache: one line, as bad data
            raise DataError(f"data cache {e.filename or entry.parent}: {e.strerror or e}") from None
    except DataError as e:
        # Other processes on this node are waiting on this entry; give them the error to raise.
        marker_tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
        with contextlib.suppress(OSError):
            marker_tmp.write_text(str(e))
            os.replace(marker_tmp, marker)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Interrupted(BaseException):
    """Raised by our signal handler to unwind data preparation (BaseException: no `except Exception` stops it)."""


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM/SIGINT unwind the block (finally clauses: the workers killed, the temporary entry
    removed), then the signal is delivered again to the handler that was installed before, so it
    has the effect it would have had (the default SIGTERM ends the process; SIGINT raises
    KeyboardInterrupt; a caller's own handler runs). If that handler returns, KeyboardInterrupt is
    raised: the data was not prepared. A second signal during the short clean-up is folded into
    the first. Only in the main thread (where Python runs signal handlers); an ignored signal stays
    ignored.
    """
    received: list[int] = []
    active = [True]

    def unwind(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1 and active[0]:
            raise _Interrupted(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python
                previous[signum] = signal.signal(signum, unwind)
    try:
        yield
    except _Interrupted:
        pass
    finally:
        active[0] = False  # a signal from here on is only recorded
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            try:
                signal.raise_signal(received[0])
            except BaseException as e:  # what that handler raised (KeyboardInterrupt): not a follow-up of ours
                raise e from None
            raise KeyboardInterrupt(f"{signal.Signals(received[0]).name} while preparing data") from None


# Set before forking the pool so workers inherit the items and the encoder instead of pickling them:
# the items (conversations or documents) and the function that encodes a slice of them.
_WORK: tuple[list[Any], Callable[[list[Any]], EncodedChunk]] | None = None
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker(ranges: list[tuple[int, int]], send: Any, readers: list[Any]) -> None:
    """A forked worker: encode `ranges` of `_WORK`, sending ("ok" | "error", index, result) per range.

    `readers`, the parent's ends of every worker pipe so far, are closed here: a worker holding one
    would keep a pipe open after the parent is killed, and its writer would block on it for good
    instead of failing with a broken pipe and exiting.
    """
    for reader in readers:
        reader.close()
    # Forked workers inherit the parent's handlers. Ctrl-C reaches the whole process group: only the
    # parent acts on it (it kills the workers). SIGTERM to the group: the workers simply die.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by the parent around the fork
    items, encode = _WORK
    try:
        for index, (start, end) in ranges:
            try:
                message = ("ok", index, encode(items[start:end]))
            except Exception as e:  # bad data (DataError) or a bug: raised again in the parent
                message = ("error", index, e)
            send.send(message)
            if message[0] == "error":
                break
    except (BrokenPipeError, ConnectionResetError):  # the parent is gone (killed): nobody to tell
        pass
    finally:
        os._exit(0)  # nothing of the parent's (atexit handlers, buffers) runs twice


def _run_workers(ranges: list[tuple[int, int]], workers: int) -> list[EncodedChunk]:
    """Encode `ranges` in `workers` forked processes, round robin; the chunks in order.

    Not `multiprocessing.Pool`: its terminate() can hang for good when a worker died while holding
    the task queue's lock (SIGTERM to the process group does that), and a worker killed by the
    system (out of memory) makes its map() wait forever. Here each worker has its own pipe, so the
    parent sees a dead worker as an early end of file, and on any exit, a signal included, kills
    and reaps every worker.
    """
    context = multiprocessing.get_context("fork")
    chunks: dict[int, EncodedChunk] = {}
    processes, pending = [], []
    try:
        for w in range(workers):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_worker, daemon=True,
                                      args=(list(enumerate(ranges))[w::workers], send, [*pending, receive]))
            # A signal between the fork and the worker's own handlers would run the parent's handler in
            # the child: held back until then (the parent's copy until start() returns).
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            send.close()  # the parent's copy: end of file once the worker's end closes
            processes.append(process)
            pending.append(receive)
        while pending:
            for receive in multiprocessing.connection.wait(pending):
                try:
                    kind, index, value = receive.recv()
                except EOFError:
                    pending.remove(receive)
                    continue
                if kind == "error":
                    raise value
                chunks[index] = value
        if len(chunks) != len(ranges):
            for process in processes:  # all have closed their pipes: exited, or about to
                process.join()
            codes = sorted({p.exitcode for p in processes if p.exitcode})
            raise DataError(f"a tokenizing worker died (exit code {', '.join(map(str, codes))}; -9 is often the "
                            "system out of memory): try fewer --preprocessing_num_workers")
    finally:
        for process in processes:
            process.kill()  # no lock is shared with them: killing cannot leave the parent waiting
        for process in processes:
            process.join()
    return [chunks[i] for i in range(len(ranges))]


def tokenize_conversations(
    conversations: list[Conversation],
    sp: Any,
    model_max_length: int,
    truncation: Literal["head", "rounds"],
    num_workers: int | None,
) -> EncodedChunk:
    """Encode many conversations, in forked worker processes when there are enough of them."""
    encoder = PlainTextEncoder(sp)
    return _encode_in_workers(conversations,
                              lambda part: encode_conversations(encoder, part, model_max_length, truncation),
                              num_workers)


def tokenize_documents(documents: list[tuple[str, str]], sp: Any, num_workers: int | None) -> EncodedChunk:
    """Encode raw-text ``(id, text)`` documents (`pretrain.encode_documents`), in forked worker
    processes when there are enough of them."""
    encoder = PlainTextEncoder(sp)
    return _encode_in_workers(documents, lambda part: encode_documents(encoder, [t for _, t in part],
                                                                       [d for d, _ in part]), num_workers)


def _encode_in_workers(items: list[Any], encode: Callable[[list[Any]], EncodedChunk],
                       num_workers: int | None) -> EncodedChunk:
    global _WORK
    workers = num_workers or min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, len(items) // MIN_PER_WORKER))
    if workers == 1:
        return encode(items)
    ranges = [(s, min(s + CHUNK_SIZE, len(items))) for s in range(0, len(items), CHUNK_SIZE)]
    _WORK = (items, encode)
    try:
        chunks = _run_workers(ranges, workers)
    finally:
        _WORK = None
    return _merge(chunks, [s for s, _ in ranges])


def _merge(chunks: list[EncodedChunk], offsets: list[int]) -> EncodedChunk:
    dropped: dict[str, int] = {}
    sources: dict[str, list[str]] = {}
    for c in chunks:
        for reason, n in c.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
            sources.setdefault(reason, []).extend(c.dropped_sources[reason])
    return EncodedChunk(
        input_ids=np.concatenate([c.input_ids for c in chunks]),
        labels=np.concatenate([c.labels for c in chunks]),
        lengths=np.concatenate([c.lengths for c in chunks]),
        kept_index=np.concatenate([c.kept_index + off for c, off in zip(chunks, offsets)]),
        full_lengths=np.concatenate([c.full_lengths for c in chunks]),
        num_truncated=sum(c.num_truncated for c in chunks),
        num_tokens=sum(c.num_tokens for c in chunks),
        dropped=dropped,
        dropped_sources=sources,
    )


def _select(chunk: EncodedChunk, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, labels and lengths of the kept examples numbered `rows` (sorted), still flat."""
    token_mask = np.repeat(np.isin(np.arange(len(chunk.lengths)), rows), chunk.lengths)
    return chunk.input_ids[token_mask], chunk.labels[token_mask], chunk.lengths[rows]


def split_sizes(n: int, val_size: float) -> int:
    """Number of evaluation examples for `val_size` (fraction < 1 or count >= 1) out of `n`."""
    k = int(round(n * val_size)) if val_size < 1 else int(val_size)
    if val_size > 0 and not 0 < k < n:
        raise DataError(f"val_size: {val_size} leaves no training or no evaluation example out of {n}")
    return k


@dataclass
class _Mixed:
    """The examples of every source, mixed (`mixing.mix_order`), and what was read on the way."""

    items: list[Any]  # conversations, or (id, text) documents for --stage pt
    source_of: np.ndarray  # int64: the source of each item
    sources: list[Source]
    read: list[int]  # records or documents read per source (bad ones included)
    bad_records: list[BadRecord]
    formats: dict[str, str]  # file -> format


_TEXT_FORMATS = {".txt": "text, one document per {}", ".json": "JSON {{{!r}}}", ".jsonl": "JSON Lines {{{!r}}}",
                 ".parquet": "Parquet column {!r}", ".arrow": "Arrow column {!r}"}


def _text_format(path: str, data_args: DataOptions) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return _TEXT_FORMATS[suffix].format("line" if data_args.txt_split == "line" else "blank-line block")
    return _TEXT_FORMATS[suffix].format(data_args.text_field)


def _read_source(path: str, data_args: DataOptions, stage: str,
                 what: str) -> tuple[list[Any], list[BadRecord], dict[str, str]]:
    """One source's items (bad records skipped and returned, whatever --on_bad_record: the caller raises)."""
    if stage != "pt":
        read = read_records(path, "skip", what=what)
        return read.conversations, read.bad_records, dict(read.formats)
    bad: list[BadRecord] = []
    docs = list(iter_documents(path, data_args.text_field, data_args.txt_split,
                               skipped=bad if data_args.on_bad_record == "skip" else None))
    return docs, bad, {f: _text_format(f, data_args) for f in source_files(path, "pt")}


def read_mixed(data_path: str, data_args: DataOptions, stage: str, seed: int, what: str = "training data") -> _Mixed:
    """Read every source of `data_path` and mix their examples; bad records raise one `DataError`
    ("error") or are skipped and counted ("skip")."""
    sources = parse_data_sources(data_path)
    parts = [_read_source(s.path, data_args, stage, what) for s in sources]
    bad = [b for _, part_bad, _ in parts for b in part_bad]
    if bad and data_args.on_bad_record == "error":
        raise bad_records_error(bad, what)
    sizes = [len(items) for items, _, _ in parts]
    weights = None if sources[0].weight is None else [s.weight for s in sources]
    strategy = data_args.mix_strategy if len(sources) > 1 else "concat"
    order = mix_order(sizes, weights, strategy, mix_seed(data_args, seed))
    formats: dict[str, str] = {}
    for _, _, part_formats in parts:
        formats.update(part_formats)
    return _Mixed(
        items=[parts[s][0][i] for s, i in order],
        source_of=np.fromiter((s for s, _ in order), dtype=np.int64, count=len(order)),
        sources=sources,
        read=[n + len(part_bad) for n, (_, part_bad, _) in zip(sizes, parts)],
        bad_records=bad,
        formats=formats,
    )


def _tokenize_to(
    out: Path, data_args: DataOptions, sp: Any, model_max_length: int, seed: int, stage: str = "sft"
) -> tuple[DataReport, dict[str, int]]:
    """Write train.arrow (and eval.arrow) into `out`; the report and the rows of each file written."""
    workers = data_args.preprocessing_num_workers
    pt = stage == "pt"
    mixed = read_mixed(data_args.data_path, data_args, stage, seed)
    if pt:
        chunk = tokenize_documents(mixed.items, sp, workers)
    else:
        chunk = tokenize_conversations(mixed.items, sp, model_max_length, data_args.truncation, workers)
    if len(chunk.lengths) == 0:
        # One line (the report's summary is several): what was read, skipped and dropped.
        skipped = {**{f"bad: {r}": n for r, n in _count_reasons(mixed.bad_records).items()}, **chunk.dropped}
        counts = "".join(f", {n} {reason}" for reason, n in sorted(skipped.items()))
        raise DataError(f"{data_args.data_path}: no {'document' if pt else 'example'} left to train on "
                        f"({sum(mixed.read)} {'document' if pt else 'record'}(s) read{counts})")

    if data_args.eval_data_path:
        eval_read = read_mixed(data_args.eval_data_path, data_args, stage, seed, what="eval data")
        if pt:
            eval_chunk = tokenize_documents(eval_read.items, sp, workers)
        else:
            eval_chunk = tokenize_conversations(eval_read.items, sp, model_max_length, data_args.truncation, workers)
        if len(eval_chunk.lengths) == 0:
            raise DataError(f"{data_args.eval_data_path}: no evaluation example left")
        parts = {"train": (chunk.input_ids, chunk.labels, chunk.lengths),
                 "eval": (eval_chunk.input_ids, eval_chunk.labels, eval_chunk.lengths)}
    elif data_args.val_size > 0:
        # pt: whole documents are split off, before they are cut into rows (no document on both sides).
        n = len(chunk.lengths)
        k = split_sizes(n, data_args.val_size)
        perm = np.random.default_rng(seed).permutation(n)
        parts = {"train": _select(chunk, np.sort(perm[k:])), "eval": _select(chunk, np.sort(perm[:k]))}
    else:
        parts = {"train": (chunk.input_ids, chunk.labels, chunk.lengths)}

    # The report's packing figures count the rows written for `chunk`'s examples (the training set,
    # and the evaluation set when it was split off them): packing is done once, here.
    packed_rows = split_documents = targets = 0
    written: dict[str, int] = {}
    for name, (ids, labels, lengths) in parts.items():
        counted = name == "train" or not data_args.eval_data_path
        if pt:
            laid = pack_documents(ids, lengths, model_max_length, data_args.pt_cross_document)
            packed = laid.rows
            table = _table(packed.input_ids, packed.labels, packed.row_lengths,
                           None if data_args.pt_cross_document else packed.segment_ids)
            if counted:
                split_documents += laid.split_documents
                targets += int((packed.labels != IGNORE_INDEX).sum())
                packed_rows += len(packed.row_lengths)
        elif data_args.packing:
            packed = pack_arrays(ids, labels, lengths, model_max_length)
            table = _table(packed.input_ids, packed.labels, packed.row_lengths, packed.segment_ids)
            if counted:
                packed_rows += len(packed.row_lengths)
        else:
            table = _table(ids, labels, lengths)
        _write_arrow(table, out / f"{name}.arrow")
        written[f"{name}.arrow"] = table.num_rows

    report = _report(mixed, chunk, model_max_length, seed,
                     packed_rows if (data_args.packing or pt) else None, stage=stage)
    report.mix_strategy = data_args.mix_strategy if len(mixed.sources) > 1 else "concat"
    report.mix_seed = mix_seed(data_args, seed)
    if pt:
        report.split_documents, report.supervised_tokens = split_documents, targets
        report.efficiency = {"packing": report.tokens / (packed_rows * model_max_length) if packed_rows else 0.0}
    for name, (_, _, lengths) in parts.items():
        setattr(report, f"{name}_examples", len(lengths))
    return report, written


def _list_column(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32, copy=False)))


def _table(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, segments: np.ndarray | None = None) -> pa.Table:
    columns = {"input_ids": _list_column(ids, lengths), "labels": _list_column(labels, lengths)}
    if segments is not None:
        columns["attention_mask"] = _list_column(segments, lengths)
    # `length` lets the Trainer's group_by_length sampler skip measuring every example.
    columns["length"] = pa.array(lengths.astype(np.int32, copy=False))
    return pa.table(columns)


def _write_arrow(table: pa.Table, path: Path) -> None:
    # The Arrow stream format is what `Dataset.from_file` memory-maps.
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=10_000)


def _count_reasons(bad_records: list[BadRecord]) -> dict[str, int]:
    """Skipped bad records by reason."""
    bad: dict[str, int] = {}
    for b in bad_records:
        bad[b.reason] = bad.get(b.reason, 0) + 1
    return bad


def _report(
    mixed: _Mixed, chunk: EncodedChunk, model_max_length: int, seed: int, packed_rows: int | None = None,
    stage: str = "sft",
) -> DataReport:
    """Counts and batching efficiency of the kept examples; `packed_rows` when they were packed."""
    lengths = chunk.lengths
    starts = np.cumsum(lengths) - lengths
    supervised = int((chunk.labels != IGNORE_INDEX).sum()) - int((chunk.labels[starts] != IGNORE_INDEX).sum())
    if stage == "pt":  # whole documents do not fit `padding_efficiency`'s rows; the caller measures the fill
        efficiency, rows = {}, packed_rows or 0
    else:
        efficiency, rows = padding_efficiency(lengths, model_max_length, seed=seed, packed_rows=packed_rows)
    kept_source = mixed.source_of[chunk.kept_index]
    per_source_examples = np.bincount(kept_source, minlength=len(mixed.sources))
    per_source_tokens = np.bincount(kept_source, weights=lengths, minlength=len(mixed.sources))
    return DataReport(
        files=dict(mixed.formats),
        records=sum(mixed.read),
        bad_records=_count_reasons(mixed.bad_records),
        dropped=dict(chunk.dropped),
        examples=len(lengths),
        truncated=chunk.num_truncated,
        model_max_length=model_max_length,
        tokens=int(lengths.sum()),
        supervised_tokens=supervised,
        length_percentiles=length_percentiles(chunk.full_lengths),
        efficiency=efficiency,
        packed_rows=rows,
        stage=stage,
        sources=[{"path": s.path, "weight": s.weight, "read": int(read), "examples": int(n), "tokens": int(t)}
                 for s, read, n, t in zip(mixed.sources, mixed.read, per_source_examples, per_source_tokens)],
    )


__all__ = ["PreparedData", "prepare_data", "read_mixed", "tokenize_conversations", "tokenize_documents", "cache_key",
           "default_cache_dir", "mix_seed", "DataError", "bad_records_error"]
