"""Tokenize training data once, cache it, and hand the trainer datasets plus a collator.

`prepare_data` is the one entry point. The tokenized (and split, and packed) data is cached under a
key made of the bytes of every data file, the tokenizer model, `model_max_length` and the options, so
a second run with the same inputs only memory-maps Arrow files. In a distributed run one process per
node (local rank 0) tokenizes; the others poll for the cache's completion marker with no timeout (not
a torch.distributed barrier, which would time out on a large dataset) and then read it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
from datasets import Dataset

from .collator import DataCollator, pack_arrays
from .data_stats import DataReport, length_percentiles, padding_efficiency
from .encoding import EncodedChunk, encode_conversations
from .modeling_baichuan import IGNORE_INDEX
from .records import Conversation, DataError, ReadResult, bad_records_error, expand_data_paths, read_records
from .tokenization_baichuan import PlainTextEncoder

CACHE_FORMAT = 1  # bump when the encoding rule or the stored layout changes
DONE_FILE = "done.json"
CHUNK_SIZE = 2000  # conversations per tokenizing task
MIN_PER_WORKER = 5000  # below this a pool costs more than it saves


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


def cache_key(data_args: DataOptions, sp: Any, model_max_length: int, seed: int) -> str:
    """Hash of everything the prepared data depends on (file contents, not names or dates)."""
    h = hashlib.sha256()
    options = {
        "format": CACHE_FORMAT,
        "model_max_length": model_max_length,
        "truncation": data_args.truncation,
        "on_bad_record": data_args.on_bad_record,
        "packing": data_args.packing,
        "val_size": data_args.val_size if not data_args.eval_data_path else 0,
        "seed": seed,
    }
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(hashlib.sha256(sp.serialized_model_proto()).digest())
    for name, spec in (("train", data_args.data_path), ("eval", data_args.eval_data_path)):
        if spec:
            h.update(name.encode())
            for path in expand_data_paths(spec):
                h.update(_file_digest(path).encode())
    return h.hexdigest()[:32]


def prepare_data(
    data_args: DataOptions,
    tokenizer: Any,
    model_max_length: int,
    seed: int = 42,
    is_main_process_on_node: bool | None = None,
) -> PreparedData:
    """Read, validate, tokenize (or load from cache), split and optionally pack the data.

    `tokenizer` is a `BaichuanTokenizer` (or anything with its ``sp_model``) or a sentencepiece
    processor. The options are taken as given: `arguments.DataArguments` checks them. Raises
    `DataError` (before any training) on bad data in "error" mode, on files it cannot read or whose
    format it does not know, and when no example is left. `is_main_process_on_node` defaults to
    ``LOCAL_RANK`` being unset or 0.
    """
    if is_main_process_on_node is None:
        is_main_process_on_node = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    sp = getattr(tokenizer, "sp_model", tokenizer)
    root = Path(data_args.data_cache_dir or default_cache_dir())
    key = cache_key(data_args, sp, model_max_length, seed)
    entry = root / key
    from_cache = (entry / DONE_FILE).exists()
    if not from_cache:
        if is_main_process_on_node:
            _build_entry(entry, data_args, sp, model_max_length, seed)
        else:
            _wait_for_entry(entry)
            from_cache = True
    report = DataReport.from_dict(json.loads((entry / DONE_FILE).read_text()))
    report.from_cache, report.cache_dir = from_cache, str(entry)
    train = Dataset.from_file(str(entry / "train.arrow"))
    eval_path = entry / "eval.arrow"
    eval_ds = Dataset.from_file(str(eval_path)) if eval_path.exists() else None
    collator = DataCollator(model_max_length=model_max_length, padding=data_args.padding)
    return PreparedData(train_dataset=train, eval_dataset=eval_ds, data_collator=collator, report=report)


def _error_marker(entry: Path) -> Path:
    return entry.with_name(entry.name + ".error")


def _wait_for_entry(entry: Path, poll_s: float = 1.0) -> None:
    # No timeout on purpose: tokenizing a large dataset may take longer than any fixed limit, and a
    # failing main process either writes the error marker (bad data) or is killed with the job.
    marker = _error_marker(entry)
    while not (entry / DONE_FILE).exists():
        if marker.exists():
            raise DataError(marker.read_text())
        time.sleep(poll_s)


def _build_entry(entry: Path, data_args: DataOptions, sp: Any, model_max_length: int, seed: int) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    marker = _error_marker(entry)
    marker.unlink(missing_ok=True)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        report = _tokenize_to(tmp, data_args, sp, model_max_length, seed)
        # The completion marker is written last, then the whole directory appears at once by rename.
        (tmp / DONE_FILE).write_text(json.dumps(report.to_dict()))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / DONE_FILE).exists():  # another node finished first otherwise
                raise
    except DataError as e:
        # Other processes on this node are waiting on this entry; give them the error to raise.
        marker_tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
        marker_tmp.write_text(str(e))
        os.replace(marker_tmp, marker)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Set before forking the pool so workers inherit conversations and the tokenizer instead of pickling them.
_WORK: tuple[list[Conversation], PlainTextEncoder, int, str] | None = None


def _encode_range(bounds: tuple[int, int]) -> EncodedChunk:
    conversations, encoder, model_max_length, truncation = _WORK
    start, end = bounds
    return encode_conversations(encoder, conversations[start:end], model_max_length, truncation)


def tokenize_conversations(
    conversations: list[Conversation],
    sp: Any,
    model_max_length: int,
    truncation: Literal["head", "rounds"],
    num_workers: int | None,
) -> EncodedChunk:
    """Encode many conversations, in a pool of forked workers when there are enough of them."""
    global _WORK
    encoder = PlainTextEncoder(sp)
    workers = num_workers or min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, len(conversations) // MIN_PER_WORKER))
    if workers == 1:
        return encode_conversations(encoder, conversations, model_max_length, truncation)
    ranges = [(s, min(s + CHUNK_SIZE, len(conversations))) for s in range(0, len(conversations), CHUNK_SIZE)]
    _WORK = (conversations, encoder, model_max_length, truncation)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_encode_range, ranges, chunksize=1)
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


def _tokenize_to(out: Path, data_args: DataOptions, sp: Any, model_max_length: int, seed: int) -> DataReport:
    workers = data_args.preprocessing_num_workers
    read = read_records(data_args.data_path, data_args.on_bad_record)
    chunk = tokenize_conversations(read.conversations, sp, model_max_length, data_args.truncation, workers)
    if len(chunk.lengths) == 0:
        # One line (the report's summary is several): what was read, skipped and dropped.
        skipped = {**{f"bad: {r}": n for r, n in _count_reasons(read).items()}, **chunk.dropped}
        counts = "".join(f", {n} {reason}" for reason, n in sorted(skipped.items()))
        raise DataError(f"{data_args.data_path}: no example left to train on "
                        f"({len(read.conversations) + len(read.bad_records)} record(s) read{counts})")

    if data_args.eval_data_path:
        eval_read = read_records(data_args.eval_data_path, data_args.on_bad_record, what="eval data")
        eval_chunk = tokenize_conversations(eval_read.conversations, sp, model_max_length,
                                            data_args.truncation, workers)
        if len(eval_chunk.lengths) == 0:
            raise DataError(f"{data_args.eval_data_path}: no evaluation example left")
        parts = {"train": (chunk.input_ids, chunk.labels, chunk.lengths),
                 "eval": (eval_chunk.input_ids, eval_chunk.labels, eval_chunk.lengths)}
    elif data_args.val_size > 0:
        n = len(chunk.lengths)
        k = split_sizes(n, data_args.val_size)
        perm = np.random.default_rng(seed).permutation(n)
        parts = {"train": _select(chunk, np.sort(perm[k:])), "eval": _select(chunk, np.sort(perm[:k]))}
    else:
        parts = {"train": (chunk.input_ids, chunk.labels, chunk.lengths)}

    # The report's packing figures count the rows written for `chunk`'s examples (the training set,
    # and the evaluation set when it was split off them): packing is done once, here.
    packed_rows = 0
    for name, (ids, labels, lengths) in parts.items():
        if data_args.packing:
            packed = pack_arrays(ids, labels, lengths, model_max_length)
            table = _table(packed.input_ids, packed.labels, packed.row_lengths, packed.segment_ids)
            if name == "train" or not data_args.eval_data_path:
                packed_rows += len(packed.row_lengths)
        else:
            table = _table(ids, labels, lengths)
        _write_arrow(table, out / f"{name}.arrow")

    report = _report(read, chunk, model_max_length, seed, packed_rows if data_args.packing else None)
    for name, (_, _, lengths) in parts.items():
        setattr(report, f"{name}_examples", len(lengths))
    return report


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


def _count_reasons(read: ReadResult) -> dict[str, int]:
    """Skipped bad records by reason."""
    bad: dict[str, int] = {}
    for b in read.bad_records:
        bad[b.reason] = bad.get(b.reason, 0) + 1
    return bad


def _report(
    read: ReadResult, chunk: EncodedChunk, model_max_length: int, seed: int, packed_rows: int | None = None
) -> DataReport:
    """Counts and batching efficiency of the kept examples; `packed_rows` when they were packed."""
    bad = _count_reasons(read)
    lengths = chunk.lengths
    starts = np.cumsum(lengths) - lengths
    supervised = int((chunk.labels != IGNORE_INDEX).sum()) - int((chunk.labels[starts] != IGNORE_INDEX).sum())
    efficiency, rows = padding_efficiency(lengths, model_max_length, seed=seed, packed_rows=packed_rows)
    return DataReport(
        files=dict(read.formats),
        records=len(read.conversations) + len(read.bad_records),
        bad_records=bad,
        dropped=dict(chunk.dropped),
        examples=len(lengths),
        truncated=chunk.num_truncated,
        model_max_length=model_max_length,
        tokens=int(lengths.sum()),
        supervised_tokens=supervised,
        length_percentiles=length_percentiles(chunk.full_lengths),
        efficiency=efficiency,
        packed_rows=rows,
    )


__all__ = ["PreparedData", "prepare_data", "tokenize_conversations", "cache_key", "default_cache_dir",
           "DataError", "bad_records_error"]
