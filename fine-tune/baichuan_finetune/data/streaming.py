"""``--streaming True``: training data read lazily, tokenized and packed on the fly, sharded across ranks,
and resumed exactly; memory stays flat whatever the corpus size.

The stream, lowest step first:

1. **Sources.** One ``datasets.IterableDataset`` per source of ``--data_path`` (`mixing.parse_data_sources`),
   its files the dataset's shards: raw-text documents (``--stage pt``, `raw_text.iter_documents`) or
   conversation records (SFT; JSON Lines read line by line, a JSON array whole). Each example is
   ``{"id", "source", "format", "payload"}``: the payload is parsed where it is tokenized.
2. **Mix.** ``datasets.interleave_datasets`` (``--mix_strategy interleave_under|interleave_over``: the
   weights as probabilities, ``first_exhausted``/``all_exhausted``, seeded by ``--mix_seed`` or
   ``--seed``) or ``concatenate_datasets`` (``concat``): the same rule as `mixing.mix_order`.
3. **Shards.** ``split_dataset_by_node(strategy="examples")``: of the mixed stream's examples
   ``i = 0, 1, 2, ...``, rank ``r`` of ``w`` keeps those with ``i % w == r``, and its dataloader worker
   ``k`` of ``K`` those with ``i % (w K) == k w + r``. No example is read by two ranks or skipped, and
   the union over ranks is the mixed stream whatever the number of ranks.
4. **Windows.** Each worker takes its examples `WINDOW` at a time, tokenizes them and packs them exactly
   as the non-streaming path does (`collator.pack_arrays`; ``--stage pt``: `pretrain.pack_documents`),
   then yields batches of ``--per_device_train_batch_size`` rows collated by `collator.DataCollator`.
   Windows are what keep memory flat: nothing holds more than one window and the prefetched batches.
5. **Epochs.** A finite stream starts again (``IterableDataset.set_epoch``: the next epoch's file order
   and mixing draws) without the Trainer noticing: training ends at ``--max_steps``, never at the end of
   the data, so every rank runs the same number of steps.

**Resume.** Every batch carries its worker's position: the datasets state at the start of its window
(``IterableDataset.state_dict``), the rows of that window consumed, the epoch, and counters. The loader
(`StreamLoader`) keeps the position of each worker as of the last batch handed to the Trainer, and every
checkpoint stores it (`save_position`, one small JSON per rank). A resumed run reloads each worker's window
start, packs that window again (packing is deterministic) and skips the rows already trained on; the
workers are rotated so that the next batch comes from the worker that was next. The Trainer's own batch
skipping is off (``ignore_data_skip``): it would re-read the stream from the start.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .collator import DataCollator, pack_arrays
from .preprocess import PreparedData, prepare_data
from .data_stats import DataReport, length_percentiles
from .encoding import encode_conversations
from .mixing import parse_data_sources, probabilities, source_files
from .pretrain import encode_documents, pack_documents
from .raw_text import iter_documents
from .records import BadRecord, DataError, detect_format, parse_record
from ..model.modeling_baichuan import IGNORE_INDEX
from ..model.tokenization_baichuan import PlainTextEncoder

WINDOW = 1000  # examples tokenized and packed together: LLaMA-Factory's (datasets.map's) batch of 1000
SAMPLE = 1000  # examples per source read for the summary's estimate
STATE_FORMAT = 1
POSITION_KEY = "stream_position"
ERROR_KEY = "stream_error"
_BAD = "bad"  # the format of an example that is a bad record (payload: its one-line description)


def state_file(rank: int) -> str:
    """The name of rank `rank`'s stream position in a checkpoint directory."""
    return f"stream_state-rank{rank}.json"


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to rebuild its share of the stream (plain values: it crosses processes)."""

    sources: tuple[tuple[str, float | None], ...]
    stage: str  # "sft" | "pt"
    mix_strategy: str
    mix_seed: int
    model_max_length: int
    batch_size: int
    packing: bool
    padding: str = "longest"
    truncation: str = "head"
    on_bad_record: str = "error"
    text_field: str = "text"
    txt_split: str = "line"
    pt_cross_document: bool = False
    rank: int = 0
    world_size: int = 1
    window: int = WINDOW

    @classmethod
    def from_options(cls, data: Any, *, stage: str, seed: int, model_max_length: int, batch_size: int,
                     rank: int = 0, world_size: int = 1) -> "StreamConfig":
        """From `arguments.DataArguments` (already checked there) and the run's other settings."""
        sources = tuple((s.path, s.weight) for s in parse_data_sources(data.data_path))
        return cls(sources=sources, stage="pt" if stage == "pt" else "sft", mix_strategy=data.mix_strategy,
                   mix_seed=seed if data.mix_seed is None else data.mix_seed, model_max_length=model_max_length,
                   batch_size=batch_size, packing=bool(data.packing) or stage == "pt", padding=data.padding,
                   truncation=data.truncation, on_bad_record=data.on_bad_record, text_field=data.text_field,
                   txt_split=data.txt_split, pt_cross_document=data.pt_cross_document, rank=max(rank, 0),
                   world_size=max(world_size, 1))


# ----- 1. sources -----


def _json_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a UTF-8 file, lazily."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            if line.strip():
                yield lineno, line


def _record_items(path: str) -> Iterator[tuple[str, str]]:
    """(where, JSON text of one record) of a JSON Lines file (lazily) or a JSON array (read whole)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    if not head.strip():
        raise DataError(f"{path}: empty file")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: a binary file (a NUL byte at byte {nul}), expected JSON")
    if head.decode("utf-8-sig", errors="replace").lstrip().startswith("["):
        # A JSON array can only be parsed whole; JSON Lines keep memory flat.
        try:
            records = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{path}: not a readable JSON array ({e.__class__.__name__}: {e})") from None
        for i, record in enumerate(records):
            yield f"{path} record {i}", json.dumps(record, ensure_ascii=False)
        return
    for lineno, line in _json_lines(path):
        yield f"{path} line {lineno}", line


def _conversation_examples(path: str, source: int) -> Iterator[dict[str, Any]]:
    """A conversation file's records, unparsed, with the format its first object record shows."""
    fmt = None
    for where, line in _record_items(path):
        if fmt is None:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                record = None
            if isinstance(record, dict):
                if "chosen" in record or "rejected" in record:
                    raise DataError(f"{where}: a preference pair ('chosen'/'rejected'), not a supervised "
                                    "conversation: --streaming trains --stage sft or pt")
                fmt = detect_format(record)
                if fmt is None:
                    raise DataError(f"{path}: unknown format (first record keys: {', '.join(list(record)[:10])}); "
                                    "expected records with 'conversations', 'messages' or 'instruction' and 'output'")
        yield {"id": where, "source": source, "format": fmt or _BAD, "payload": line}


def _document_examples(path: str, source: int, text_field: str, txt_split: str,
                       skip_bad: bool) -> Iterator[dict[str, Any]]:
    """A raw-text file's documents; with `skip_bad`, its bad records as examples of format `_BAD`."""
    skipped: list[BadRecord] | None = [] if skip_bad else None
    seen = 0
    for doc_id, text in iter_documents(path, text_field, txt_split, skipped=skipped):
        while skipped and seen < len(skipped):
            yield {"id": skipped[seen].where, "source": source, "format": _BAD, "payload": skipped[seen].reason}
            seen += 1
        yield {"id": doc_id, "source": source, "format": "text", "payload": text}
    while skipped and seen < len(skipped):
        yield {"id": skipped[seen].where, "source": source, "format": _BAD, "payload": skipped[seen].reason}
        seen += 1


def _source_examples(files: list[str], source: int, stage: str, text_field: str, txt_split: str,
                     skip_bad: bool) -> Iterator[dict[str, Any]]:
    """The generator of one source's ``datasets.IterableDataset``; `files` are its shards."""
    for path in files:
        if stage == "pt":
            yield from _document_examples(path, source, text_field, txt_split, skip_bad)
        else:
            yield from _conversation_examples(path, source)


def source_dataset(config: StreamConfig, index: int):
    """Source `index` of the mix as a ``datasets.IterableDataset`` (one shard per file)."""
    from datasets import IterableDataset

    files = source_files(config.sources[index][0], config.stage)
    return IterableDataset.from_generator(_source_examples, gen_kwargs={
        "files": files, "source": index, "stage": config.stage, "text_field": config.text_field,
        "txt_split": config.txt_split, "skip_bad": config.on_bad_record == "skip"})


# ----- 2-3. mix and shards -----


def mixed_stream(config: StreamConfig, node: int = 0, nodes: int = 1):
    """The mixed stream of every source, keeping examples ``i`` with ``i % nodes == node``."""
    from datasets import concatenate_datasets, interleave_datasets
    from datasets.distributed import split_dataset_by_node

    parts = [source_dataset(config, i) for i in range(len(config.sources))]
    if len(parts) == 1:
        stream = parts[0]
    elif config.mix_strategy == "concat":
        stream = concatenate_datasets(parts)
    else:
        weights = [w for _, w in config.sources]
        stream = interleave_datasets(
            parts, probabilities=probabilities(None if weights[0] is None else weights), seed=config.mix_seed,
            stopping_strategy="first_exhausted" if config.mix_strategy == "interleave_under" else "all_exhausted")
    if nodes > 1:
        stream = split_dataset_by_node(stream, rank=node, world_size=nodes, strategy="examples")
    return stream


# ----- 4. windows: tokenize and pack -----


@dataclass
class Rows:
    """Rows of one window, flat and back to back, and what the window held."""

    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray | None  # packed rows only
    row_lengths: np.ndarray
    example_lengths: np.ndarray  # tokens of each kept example (a document before it is split into pieces)
    counts: dict[str, int] = field(default_factory=dict)  # "examples/<source>", "tokens/<source>", "bad/...", ...

    def row(self, i: int, starts: np.ndarray) -> dict[str, np.ndarray]:
        s, n = int(starts[i]), int(self.row_lengths[i])
        out = {"input_ids": self.input_ids[s:s + n], "labels": self.labels[s:s + n]}
        if self.segment_ids is not None:
            out["attention_mask"] = self.segment_ids[s:s + n]
        return out


def _add(counts: dict[str, int], key: str, n: int) -> None:
    if n:
        counts[key] = counts.get(key, 0) + int(n)


def encode_window(config: StreamConfig, encoder: PlainTextEncoder, examples: dict[str, list]) -> Rows:
    """Tokenize and pack one window of examples (columns as ``IterableDataset.iter`` gives them).

    Bad records raise `DataError` naming file, record and field (``--on_bad_record error``) or are counted
    (``skip``), as are examples dropped by the encoding rule (no supervised label, an empty document).
    """
    counts: dict[str, int] = {}
    good: list[int] = []
    items: list[Any] = []
    for i, (where, fmt, payload) in enumerate(zip(examples["id"], examples["format"], examples["payload"])):
        if fmt == _BAD:
            if config.stage == "sft":  # a record before the file's first object record
                try:
                    bad = parse_record(json.loads(payload), "sharegpt", where)
                except (json.JSONDecodeError, RecursionError) as e:
                    bad = BadRecord(where, "", f"invalid JSON: {e}", "invalid JSON")
                _bad(config, counts, bad)
            else:
                _add(counts, f"bad/{payload}", 1)
            continue
        if config.stage == "pt":
            good.append(i)
            items.append(payload)
            continue
        try:
            conversation = parse_record(json.loads(payload), fmt, where)
        except (json.JSONDecodeError, RecursionError) as e:
            conversation = BadRecord(where, "", f"invalid JSON: {e}", "invalid JSON")
        if isinstance(conversation, BadRecord):
            _bad(config, counts, conversation)
            continue
        good.append(i)
        items.append(conversation)
    sources = [examples["source"][i] for i in good]
    ids = [examples["id"][i] for i in good]
    if config.stage == "pt":
        chunk = encode_documents(encoder, items, ids)
    else:
        chunk = encode_conversations(encoder, items, config.model_max_length, config.truncation)
    for reason, n in chunk.dropped.items():
        _add(counts, f"dropped/{reason}", n)
    for j, length in zip(chunk.kept_index.tolist(), chunk.lengths.tolist()):
        _add(counts, f"examples/{sources[j]}", 1)
        _add(counts, f"tokens/{sources[j]}", length)
    if config.stage == "pt":
        packed = pack_documents(chunk.input_ids, chunk.lengths, config.model_max_length,
                                config.pt_cross_document).rows
        _add(counts, "split_documents", int((chunk.lengths > config.model_max_length).sum()))
        return Rows(packed.input_ids, packed.labels, packed.segment_ids, packed.row_lengths, chunk.full_lengths, counts)
    if config.packing:
        packed = pack_arrays(chunk.input_ids, chunk.labels, chunk.lengths, config.model_max_length)
        return Rows(packed.input_ids, packed.labels, packed.segment_ids, packed.row_lengths, chunk.full_lengths, counts)
    return Rows(chunk.input_ids, chunk.labels, None, chunk.lengths.astype(np.int32), chunk.full_lengths, counts)


def _bad(config: StreamConfig, counts: dict[str, int], bad: BadRecord) -> None:
    if config.on_bad_record != "skip":
        raise DataError(f"bad record in the training data: {bad} (use on_bad_record='skip' to drop it)")
    _add(counts, f"bad/{bad.reason}", 1)


# ----- 4-5. one worker's batches, with their positions -----


@dataclass
class WorkerPosition:
    """Where one (logical) worker's stream stands: enough to rebuild its next batch exactly."""

    epoch: int = 0
    window_state: dict | None = None  # IterableDataset.state_dict() at the window's start; None: the epoch's start
    rows_done: int = 0  # rows of that window already handed out
    counts_before: dict[str, int] = field(default_factory=dict)  # counters of the windows before it
    counts_window: dict[str, int] = field(default_factory=dict)  # counters of that window


def node_of(rank: int, world_size: int, worker: int, workers: int) -> tuple[int, int]:
    """(node, nodes) of dataloader worker `worker` of `workers` on rank `rank` of `world_size`: the worker
    reads examples ``i`` with ``i % nodes == node``, so its rank reads those with ``i % world_size == rank``
    whatever the number of workers."""
    return worker * world_size + rank, world_size * workers


def _sentencepiece(proto: bytes):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp


def worker_batches(config: StreamConfig, proto: bytes, logical: int, workers: int,
                   start: WorkerPosition) -> Iterator[dict[str, Any]]:
    """The batches of logical worker `logical` of `workers` on this rank, from `start`, forever (epoch after
    epoch). Each batch holds its position after it under `POSITION_KEY`."""
    encoder = PlainTextEncoder(_sentencepiece(proto))
    collate = DataCollator(model_max_length=config.model_max_length, padding=config.padding)
    node, nodes = node_of(config.rank, config.world_size, logical, workers)
    position = WorkerPosition(**asdict(start))
    pending: list[dict[str, np.ndarray]] = []
    while True:
        stream = mixed_stream(config, node, nodes)
        stream.set_epoch(position.epoch)
        if position.window_state is not None:
            stream.load_state_dict(position.window_state)
        window_state, skip, rows_this_epoch = position.window_state, position.rows_done, 0
        counts_before = dict(position.counts_before)
        for examples in stream.iter(batch_size=config.window):
            rows = encode_window(config, encoder, examples)
            starts = np.cumsum(rows.row_lengths) - rows.row_lengths
            rows_this_epoch += len(rows.row_lengths)
            for i in range(skip, len(rows.row_lengths)):
                pending.append(rows.row(i, starts))
                if len(pending) == config.batch_size:
                    batch = collate(pending)
                    pending = []
                    batch[POSITION_KEY] = {"worker": logical, **asdict(WorkerPosition(
                        position.epoch, window_state, i + 1, counts_before, rows.counts))}
                    yield batch
            skip = 0
            for key, n in rows.counts.items():
                _add(counts_before, key, n)
            window_state = stream.state_dict()
        if rows_this_epoch == 0 and position.window_state is None:
            where = f"rank {config.rank} of {config.world_size}" + (f", dataloader worker {logical} of {workers}"
                                                                   if workers > 1 else "")
            raise DataError(f"{', '.join(p for p, _ in config.sources)}: no training row for {where} "
                            "(fewer examples than processes x dataloader workers, or every record bad or dropped)")
        # The rows left over (fewer than a batch) open the next epoch's first batch: no row is lost.
        position = WorkerPosition(position.epoch + 1, None, 0, counts_before, {})


class StreamingDataset(torch.utils.data.IterableDataset):
    """This rank's training batches (already collated: use with ``batch_size=None``), forever.

    In dataloader worker ``j`` of ``K`` it plays logical worker ``(j + offset) % K``, where ``offset`` is
    the number of batches trained before a resume: the rotation keeps the round-robin order of a run that
    was never stopped.
    """

    def __init__(self, config: StreamConfig, sp_model: Any):
        super().__init__()
        self.config = config
        self.proto = sp_model.serialized_model_proto()
        self.workers = 1
        self.offset = 0
        self.start: dict[int, WorkerPosition] = {}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `StreamLoader.state` (a checkpoint's position of this rank)."""
        self.workers = state["workers"]
        self.offset = state["batches"] % state["workers"]
        self.start = {int(k): WorkerPosition(**v) for k, v in state["positions"].items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, workers = (0, 1) if info is None else (info.id, info.num_workers)
        logical = (physical + self.offset) % workers
        try:
            yield from worker_batches(self.config, self.proto, logical, workers,
                                      self.start.get(logical, WorkerPosition()))
        except DataError as e:  # crosses the worker's queue as data: a worker's exception arrives as a traceback
            yield {ERROR_KEY: str(e)}


def _passthrough(batch: Any) -> Any:
    return batch


class StreamLoader:
    """The Trainer's training dataloader for `StreamingDataset`: batches in order, the position of every
    worker as of the last batch handed out (`state`), no length (the Trainer runs to ``--max_steps``)."""

    def __init__(self, dataset: StreamingDataset, num_workers: int, prefetch_factor: int | None = None,
                 pin_memory: bool = False):
        self.check_workers(dataset, num_workers)
        self.dataset = dataset
        dataset.workers = max(num_workers, 1)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, collate_fn=_passthrough, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None)
        self.batches = 0
        self.positions: dict[int, dict] = {k: asdict(v) for k, v in dataset.start.items()}

    @staticmethod
    def check_workers(dataset: StreamingDataset, num_workers: int) -> None:
        """`DataError` when a restored stream was read by another number of workers (0 and 1 are the same:
        one stream per rank), whose shares of it differ."""
        if dataset.start and max(num_workers, 1) != dataset.workers:
            raise DataError(f"--dataloader_num_workers {num_workers}: the checkpoint's stream was read by "
                            f"{dataset.workers} worker(s); resume with the same number to continue it exactly")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            if ERROR_KEY in batch:
                raise DataError(batch[ERROR_KEY])
            position = batch.pop(POSITION_KEY)
            self.positions[position.pop("worker")] = position
            self.batches += 1
            yield batch

    def state(self) -> dict[str, Any]:
        """This rank's position (JSON-able): what `StreamingDataset.restore` continues from."""
        config = self.dataset.config
        return {"format": STATE_FORMAT, "rank": config.rank, "world_size": config.world_size,
                "workers": self.dataset.workers, "batches": self.dataset.offset + self.batches,
                "positions": {str(k): v for k, v in sorted(self.positions.items())}}

    def counts(self) -> dict[str, int]:
        """This rank's counters of the stream read so far (examples and tokens per source, bad, dropped)."""
        total: dict[str, int] = {}
        for position in self.positions.values():
            for part in ("counts_before", "counts_window"):
                for key, n in position[part].items():
                    _add(total, key, n)
        return total


def save_position(loader: StreamLoader, checkpoint_dir: str | Path) -> Path:
    """Write this rank's stream position into a checkpoint directory (every rank writes its own)."""
    path = Path(checkpoint_dir) / state_file(loader.dataset.config.rank)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(loader.state()) + "\n")
    os.replace(tmp, path)
    return path


def load_position(checkpoint_dir: str | Path, config: StreamConfig) -> dict[str, Any]:
    """This rank's stream position in a checkpoint; `DataError` when it is missing or was written by a run
    with another number of processes (whose shares of the stream differ)."""
    path = Path(checkpoint_dir) / state_file(config.rank)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing: {checkpoint_dir} was not written by a --streaming run, so where the "
                        "stream stands is unknown") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable stream position ({e})") from None
    if state.get("format") != STATE_FORMAT or not isinstance(state.get("positions"), dict):
        raise DataError(f"{path}: not a stream position of this version")
    if state["world_size"] != config.world_size:
        raise DataError(f"{path}: written by {state['world_size']} process(es), resumed with {config.world_size}: "
                        "each process reads its own share of the stream; resume with the same number")
    return state


# ----- the summary: an estimate from the first examples of each source -----


@dataclass
class StreamReport:
    """The data summary of a streaming run: `DataReport` figures estimated from a sample of each source."""

    sample: DataReport
    sample_size: int

    def format(self) -> str:
        """The report, saying that its figures are estimates from a sample."""
        lines = self.sample.format().splitlines()
        unit = "documents" if self.sample.stage == "pt" else "records"
        lines[0] = (f"Data (--streaming: estimated from the first {self.sample_size} {unit} of each source; "
                    "read lazily while training):")
        return "\n".join(lines)


def estimate_report(config: StreamConfig, sp_model: Any, sample: int = SAMPLE) -> StreamReport:
    """Read the first `sample` examples of each source (this also checks every source's files before any
    work: a missing, empty or binary file is a `DataError`), encode and pack them as training will."""
    encoder = PlainTextEncoder(sp_model)
    one = replace(config, rank=0, world_size=1, window=sample)
    read, kept_lengths, files = [], [], {}
    rows = tokens = targets = split = 0
    sources: list[dict[str, Any]] = []
    bad: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for index, (path, weight) in enumerate(config.sources):
        for file in source_files(path, config.stage):
            files[file] = "raw text" if config.stage == "pt" else "conversations"
            _first_example(config, file, index)
        examples = next(iter(source_dataset(one, index).iter(batch_size=sample)), None)
        if examples is None:
            raise DataError(f"{path}: no example in it")
        n = len(examples["id"])
        window = encode_window(one, encoder, examples)
        kept_lengths.append(window.example_lengths)
        rows += len(window.row_lengths)
        tokens += int(window.row_lengths.sum())
        targets += int((window.labels != IGNORE_INDEX).sum())
        split += window.counts.get("split_documents", 0)
        for key, m in window.counts.items():
            kind, _, reason = key.partition("/")
            if kind == "bad":
                bad[reason] = bad.get(reason, 0) + m
            elif kind == "dropped":
                dropped[reason] = dropped.get(reason, 0) + m
        read.append(n)
        sources.append({"path": path, "weight": weight, "read": n,
                        "examples": window.counts.get(f"examples/{index}", 0),
                        "tokens": window.counts.get(f"tokens/{index}", 0)})
    kept = sum(s["examples"] for s in sources)
    if len(config.sources) > 1 and config.mix_strategy != "concat":
        # The mix's shares from the start of the mixed stream itself (its draws), tokens from each source's
        # mean tokens per example in its sample.
        drawn = np.zeros(len(config.sources), dtype=np.int64)
        for examples in mixed_stream(one).iter(batch_size=sample * len(sources)):
            drawn += np.bincount(np.asarray(examples["source"], dtype=np.int64), minlength=len(sources))
            break
        for s, n in zip(sources, drawn.tolist()):
            s["tokens"] = round(n * s["tokens"] / max(s["examples"], 1))
            s["examples"] = n
    lengths = np.concatenate(kept_lengths) if kept_lengths else np.zeros(0, dtype=np.int64)
    fill = tokens / (rows * config.model_max_length) if rows else 0.0
    report = DataReport(files=files, records=sum(read), bad_records=bad, dropped=dropped,
                        examples=kept, model_max_length=config.model_max_length,
                        tokens=tokens, supervised_tokens=targets, length_percentiles=length_percentiles(lengths),
                        efficiency={"max_length": 0.0, "longest": 0.0, "packing": fill} if config.stage == "pt"
                        else {}, packed_rows=rows, train_examples=kept,
                        stage=config.stage, mix_strategy=config.mix_strategy, mix_seed=config.mix_seed,
                        sources=sources, split_documents=split, batch_size=config.batch_size)
    return StreamReport(report, sample)


def _first_example(config: StreamConfig, file: str, index: int) -> None:
    """Read one example of `file`: its file-level problems (empty, binary, unknown format) before any work."""
    examples = _source_examples([file], index, config.stage, config.text_field, config.txt_split,
                                skip_bad=True)
    if next(examples, None) is None:
        raise DataError(f"{file}: empty file (no example in it)")


def prepare_stream(data_args: Any, tokenizer: Any, training: Any, resume: str | None = None) -> PreparedData:
    """The training stream of this rank (continuing `resume`'s position), the evaluation set (read whole
    and cached, as without --streaming) and the estimated summary. Every source's files are checked here,
    before the model is loaded."""
    sp = getattr(tokenizer, "sp_model", tokenizer)
    config = StreamConfig.from_options(data_args, stage=training.stage, seed=training.seed,
                                       model_max_length=training.model_max_length,
                                       batch_size=training.per_device_train_batch_size,
                                       rank=training.process_index, world_size=training.world_size)
    report = estimate_report(config, sp)
    stream = StreamingDataset(config, sp)
    if resume:
        stream.restore(load_position(resume, config))
        StreamLoader.check_workers(stream, training.dataloader_num_workers)  # before the model loads
    eval_dataset = None
    if data_args.eval_data_path:
        eval_args = replace(data_args, data_path=data_args.eval_data_path, eval_data_path=None, streaming=False)
        eval_dataset = prepare_data(eval_args, tokenizer, training.model_max_length, seed=training.seed,
                                    stage=config.stage).train_dataset
    collator = DataCollator(model_max_length=training.model_max_length, padding=data_args.padding)
    return PreparedData(train_dataset=stream, eval_dataset=eval_dataset, data_collator=collator, report=report)


def describe_counts(counts: dict[str, int], sources: tuple[tuple[str, float | None], ...]) -> str:
    """One line of what a rank's stream gave so far: examples and tokens per source, skipped and dropped."""
    examples = sum(counts.get(f"examples/{i}", 0) for i in range(len(sources))) or 1
    parts = [f"{path}: {counts.get(f'examples/{i}', 0)} examples ({counts.get(f'examples/{i}', 0) / examples:.1%}), "
             f"{counts.get(f'tokens/{i}', 0)} tokens" for i, (path, _) in enumerate(sources)]
    for kind, title in (("bad", "skipped bad records"), ("dropped", "dropped")):
        found = {k.split("/", 1)[1]: n for k, n in counts.items() if k.startswith(kind + "/")}
        if found:
            parts.append(f"{title}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(found.items())))
    return "; ".join(parts)


__all__ = ["WINDOW", "StreamConfig", "StreamLoader", "StreamReport", "StreamingDataset", "WorkerPosition",
           "describe_counts", "encode_window", "estimate_report", "load_position", "mixed_stream", "node_of",
           "prepare_stream", "save_position", "state_file", "worker_batches"]
