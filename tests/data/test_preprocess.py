"""prepare_data: cache hits, one tokenizing process per node, splits, and errors before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from baichuan_finetune.data import preprocess
from baichuan_finetune.options.arguments import DataArguments, UsageError
from baichuan_finetune.data.preprocess import prepare_data
from baichuan_finetune.data.records import DataError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TOKENIZER = FIXTURES / "baichuan2" / "tokenizer.model"
FASTCHAT = FIXTURES / "data" / "fastchat_dummy_conversation.json"


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


class FakeTokenizer:
    """What prepare_data needs of BaichuanTokenizer: `sp_model` and `vocab_file`."""

    def __init__(self, sp):
        self.sp_model, self.vocab_file = sp, str(TOKENIZER)


def rows(ds):
    return [(r["input_ids"], r["labels"]) for r in ds]


@pytest.fixture
def tokenize_calls(monkeypatch):
    """Counts calls of preprocess.tokenize_conversations (the only way prepare_data tokenizes)."""
    calls = []
    tokenize = preprocess.tokenize_conversations

    def counting(*args, **kwargs):
        calls.append(args)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(preprocess, "tokenize_conversations", counting)
    return calls


def test_second_run_is_a_cache_hit(sp, tmp_path, tokenize_calls):
    args = DataArguments(data_path=str(REPO / "data" / "examples"), data_cache_dir=str(tmp_path))
    first = prepare_data(args, FakeTokenizer(sp), 512)
    assert len(tokenize_calls) == 1 and not first.report.from_cache
    arrow = Path(first.report.cache_dir) / "train.arrow"
    written = (arrow.stat().st_ino, arrow.stat().st_mtime_ns)
    second = prepare_data(args, FakeTokenizer(sp), 512)
    assert len(tokenize_calls) == 1, "the second run tokenized again"
    assert (arrow.stat().st_ino, arrow.stat().st_mtime_ns) == written, "the second run rewrote the cache"
    assert second.report.from_cache and second.report.cache_dir == first.report.cache_dir
    assert rows(second.train_dataset) == rows(first.train_dataset)
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.report.cache_dir).name]
    # Anything the data depends on changes the key.
    prepare_data(args, FakeTokenizer(sp), 256)
    prepare_data(DataArguments(data_path=args.data_path, data_cache_dir=str(tmp_path), truncation="rounds"), sp, 512)
    assert len(tokenize_calls) == 3


def test_cache_key_follows_file_content_not_name(sp, tmp_path):
    data = tmp_path / "d.json"
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    data.write_text(json.dumps([record]))
    args = DataArguments(data_path=str(data), data_cache_dir=str(tmp_path / "cache"))
    key = preprocess.cache_key(args, sp, 512, 42)
    record["conversations"][1]["value"] = "hello!"
    data.write_text(json.dumps([record]))
    assert preprocess.cache_key(args, sp, 512, 42) != key


def test_val_size_split_is_deterministic_and_disjoint(sp, tmp_path):
    whole = prepare_data(DataArguments(data_path=str(FASTCHAT), data_cache_dir=str(tmp_path)), sp, 512)
    args = DataArguments(data_path=str(FASTCHAT), data_cache_dir=str(tmp_path / "b"), val_size=0.1)
    a = prepare_data(args, sp, 512, seed=1)
    assert len(a.eval_dataset) == 10 and len(a.train_dataset) == 90  # the 100-record sample
    assert sorted(map(str, rows(a.train_dataset) + rows(a.eval_dataset))) == sorted(map(str, rows(whole.train_dataset)))
    b = prepare_data(DataArguments(data_path=str(FASTCHAT), data_cache_dir=str(tmp_path / "c"), val_size=10), sp, 512, seed=1)
    assert rows(b.eval_dataset) == rows(a.eval_dataset)
    c = prepare_data(args, sp, 512, seed=2)
    assert rows(c.eval_dataset) != rows(a.eval_dataset)


def test_bad_data_raises_before_anything_is_returned(sp, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'
                    '{"conversations": [{"from": "bot", "value": "b"}]}\n')
    args = DataArguments(data_path=str(data), data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"bad.jsonl line 2: conversations\[0\].from: unknown role 'bot'"):
        prepare_data(args, sp, 512)
    # The waiting processes of the node get the same error instead of waiting forever.
    with pytest.raises(DataError, match="unknown role 'bot'"):
        prepare_data(args, sp, 512, is_main_process_on_node=False)
    skipped = prepare_data(DataArguments(data_path=str(data), data_cache_dir=str(tmp_path / "cache"),
                                         on_bad_record="skip"), sp, 512)
    assert len(skipped.train_dataset) == 1 and skipped.report.bad_records == {"unknown role": 1}


def test_no_example_left_is_an_error(sp, tmp_path):
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "only a question"}]}]))
    with pytest.raises(DataError, match="no example left"):
        prepare_data(DataArguments(data_path=str(data), data_cache_dir=str(tmp_path / "c")), sp, 512)


@pytest.mark.parametrize("field, value", [("padding", "short"), ("truncation", "tail"), ("on_bad_record", "warn"),
                                          ("val_size", -1.0), ("val_size", 2.5)])
def test_bad_arguments_one_line_error(field, value):
    # Flags are checked once, where they are parsed; prepare_data takes them as given.
    with pytest.raises(UsageError) as err:
        DataArguments(data_path="x.json", **{field: value})
    assert str(err.value).startswith(f"--{field} ") and "\n" not in str(err.value)


def test_packed_dataset_columns(sp, tmp_path):
    args = DataArguments(data_path=str(REPO / "data" / "quickstart.json"), data_cache_dir=str(tmp_path), packing=True)
    prepared = prepare_data(args, sp, 256)
    row = prepared.train_dataset[0]
    assert set(prepared.train_dataset.column_names) == {"input_ids", "labels", "attention_mask", "length"}
    assert max(row["attention_mask"]) > 1 and len(row["input_ids"]) == row["length"] <= 256
    assert sum(prepared.train_dataset["length"]) == prepared.report.tokens
    # The report's packing figures are those of the rows written, not of a second packing.
    assert prepared.report.packed_rows == len(prepared.train_dataset)
    assert prepared.report.efficiency["packing"] == prepared.report.tokens / (len(prepared.train_dataset) * 256)


CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    import sentencepiece as spm
    from baichuan_finetune.data import preprocess
    from baichuan_finetune.options.arguments import DataArguments, UsageError
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    prepared = preprocess.prepare_data(DataArguments(data_path=sys.argv[2], data_cache_dir=sys.argv[3]), sp, 1024)
    digest = hashlib.sha256(json.dumps(prepared.train_dataset.to_dict()).encode()).hexdigest()
    print(json.dumps({"from_cache": prepared.report.from_cache, "cache_dir": prepared.report.cache_dir,
                      "digest": digest, "rows": len(prepared.train_dataset)}))
    """
)


def test_two_processes_one_tokenizes(sp, tmp_path):
    waiting, main = _run_ranks(tmp_path)
    # Only the main process wrote the entry; the waiting one read what it wrote, and nothing else was left.
    assert (main["from_cache"], waiting["from_cache"]) == (False, True)
    assert main["cache_dir"] == waiting["cache_dir"]
    assert [p.name for p in tmp_path.iterdir()] == [Path(main["cache_dir"]).name]
    assert main["digest"] == waiting["digest"] and main["rows"] == 100


# --- The cache is checked on every use; signals leave nothing partial. ---

BIG_RECORDS = 20_500  # above 2 x MIN_PER_WORKER (a pool of 2) and over 2 Arrow record batches of 10,000 rows


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    """FASTCHAT's 100 records repeated: enough for a worker pool and a multi-batch train.arrow."""
    records = json.loads(FASTCHAT.read_text())
    path = tmp_path_factory.mktemp("big") / "big.json"
    path.write_text(json.dumps((records * (BIG_RECORDS // len(records) + 1))[:BIG_RECORDS]))
    return path


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "baichuan_finetune.data.preprocess"
            and r.levelname == "WARNING"]


def test_cache_truncated_at_a_batch_boundary_is_rebuilt(sp, tmp_path, big_data, caplog):
    import pyarrow as pa
    from datasets import Dataset

    args = DataArguments(data_path=str(big_data), data_cache_dir=str(tmp_path), preprocessing_num_workers=2)
    fresh = prepare_data(args, sp, 1024)
    entry = Path(fresh.report.cache_dir)
    arrow = entry / "train.arrow"
    written = sha256(arrow)
    assert len(fresh.train_dataset) == fresh.report.train_examples == BIG_RECORDS
    del fresh  # the memory map: the file is cut below
    # Cut the file after its second record batch: still a valid Arrow stream, only with fewer rows.
    with pa.OSFile(str(arrow)) as source:
        boundaries = [source.tell() for _ in pa.ipc.open_stream(source)]
    os.truncate(arrow, boundaries[1])
    assert len(Dataset.from_file(str(arrow))) == 20_000  # what training read before: no error at all

    again = prepare_data(args, sp, 1024)
    assert not again.report.from_cache, "the truncated cache was used"
    assert len(again.train_dataset) == again.report.train_examples == BIG_RECORDS
    assert sha256(arrow) == written  # the rebuilt file is the fresh run's, byte for byte
    (line,) = cache_warnings(caplog)
    assert f"{arrow}: 20000 rows, done.json records {BIG_RECORDS}" in line and "\n" not in line
    assert prepare_data(args, sp, 1024).report.from_cache  # and the rebuilt entry is used again
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def _flip_middle_byte(entry: Path) -> None:
    arrow = entry / "train.arrow"
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the token ids: still a readable stream of the same rows
    arrow.write_bytes(bytes(data))


def _cut_inside_a_batch(entry: Path) -> None:
    arrow = entry / "train.arrow"
    os.truncate(arrow, arrow.stat().st_size // 2)


def _garble_header(entry: Path) -> None:
    arrow = entry / "train.arrow"
    data = arrow.read_bytes()
    arrow.write_bytes(bytes(range(256)) * 2 + data[512:])


def _entry_is_a_file(entry: Path) -> None:
    import shutil

    shutil.rmtree(entry)
    entry.write_text("not a directory")


BREAKERS = {
    "bit-flip": (_flip_middle_byte, "train.arrow: sha256 differs from done.json"),
    "cut-inside-a-batch": (_cut_inside_a_batch, "train.arrow: not a readable Arrow stream"),
    "garbled-header": (_garble_header, "train.arrow: not a readable Arrow stream"),
    "missing-file": (lambda e: (e / "train.arrow").unlink(), "train.arrow: missing"),
    "empty-done": (lambda e: (e / "done.json").write_text(""), "done.json: empty"),
    "invalid-done": (lambda e: (e / "done.json").write_text('{"files": '), "done.json: not a valid completion marker"),
    "old-done": (lambda e: (e / "done.json").write_text('{"examples": 100}'), "done.json: not a valid completion"),
    "no-done": (lambda e: (e / "done.json").unlink(), "done.json: missing"),
    "entry-is-a-file": (_entry_is_a_file, ": not a directory"),
}


@pytest.mark.parametrize("breaker", BREAKERS)
def test_damaged_cache_is_reported_and_rebuilt(sp, tmp_path, caplog, breaker):
    breaks, message = BREAKERS[breaker]
    args = DataArguments(data_path=str(FASTCHAT), data_cache_dir=str(tmp_path), val_size=10)
    fresh = prepare_data(args, sp, 512)
    entry = Path(fresh.report.cache_dir)
    expected = (rows(fresh.train_dataset), rows(fresh.eval_dataset), fresh.report.to_dict())
    del fresh
    breaks(entry)
    again = prepare_data(args, sp, 512)
    assert not again.report.from_cache
    assert (rows(again.train_dataset), rows(again.eval_dataset), again.report.to_dict()) == expected
    (line,) = cache_warnings(caplog)
    assert message in line and str(entry) in line and line.endswith("; rebuilding it") and "\n" not in line
    assert prepare_data(args, sp, 512).report.from_cache
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_cache_root_that_is_a_file_is_one_line(sp, tmp_path):
    root = tmp_path / "cache"
    root.write_text("mine")
    with pytest.raises(DataError, match=rf"^data cache directory {root}: not a directory") as err:
        prepare_data(DataArguments(data_path=str(FASTCHAT), data_cache_dir=str(root)), sp, 512)
    assert "\n" not in str(err.value) and root.read_text() == "mine"


def test_waiting_rank_never_reads_a_damaged_cache(sp, tmp_path):
    fresh = prepare_data(DataArguments(data_path=str(FASTCHAT), data_cache_dir=str(tmp_path)), sp, 1024)
    entry = Path(fresh.report.cache_dir)
    del fresh
    _cut_inside_a_batch(entry)
    waiting, main = _run_ranks(tmp_path)
    assert (main["from_cache"], waiting["from_cache"]) == (False, True)
    assert main["digest"] == waiting["digest"] and main["rows"] == waiting["rows"] == 100
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def _run_ranks(cache: Path) -> list[dict]:
    """The outputs of CHILD as local ranks 1 and 0 sharing `cache`."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "fine-tune"))
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(TOKENIZER), str(FASTCHAT), str(cache)],
                         env=dict(env, LOCAL_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (1, 0)  # the waiting rank starts first (and sees a damaged entry before rank 0 does)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


TOKENIZING_CHILD = textwrap.dedent(
    """
    import sys
    import sentencepiece as spm
    from baichuan_finetune.data import preprocess
    from baichuan_finetune.options.arguments import DataArguments
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    args = DataArguments(data_path=sys.argv[2], data_cache_dir=sys.argv[3], preprocessing_num_workers=2)
    preprocess.prepare_data(args, sp, 1024)
    """
)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _interrupt_tokenizing(big_data: Path, cache: Path, signum: signal.Signals, worker: bool = False) -> tuple[int, str]:
    """Run TOKENIZING_CHILD, send `signum` once its workers run (to one worker with `worker`); its exit
    status and stderr, once its workers are gone too. Whatever happens, nothing of the child outlives the test."""
    import time

    child = subprocess.Popen([sys.executable, "-c", TOKENIZING_CHILD, str(TOKENIZER), str(big_data), str(cache)],
                             env=dict(os.environ, PYTHONPATH=str(REPO / "fine-tune")),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        workers: list[int] = []
        while len(workers) < 2 and child.poll() is None:  # the pool is up: tokenizing
            time.sleep(0.02)
            workers = _children(child.pid)
        assert child.poll() is None, child.stderr.read()
        # SIGTERM and SIGINT to the process group, as from Slurm or Ctrl-C; SIGKILL to the main process
        # only (its workers must not outlive it).
        if worker:
            os.kill(workers[0], signum)
        elif signum == signal.SIGKILL:
            child.kill()
        else:
            os.killpg(child.pid, signum)
        _, err = child.communicate(timeout=120)  # a hang guard, not a timing check
        deadline = time.monotonic() + 60
        while not all(map(_gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(map(_gone, workers)), "pool workers outlived the interrupted process"
        return child.returncode, err
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        child.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_during_tokenization_leaves_no_partial_cache(sp, tmp_path, big_data, signum):
    cache = tmp_path / "cache"
    returncode, err = _interrupt_tokenizing(big_data, cache, signum)
    assert returncode == -signum, err  # the signal's own effect once the cache is cleaned up
    # The workers leave the signal to their parent: no traceback of theirs (an uncaught KeyboardInterrupt
    # prints the main process's, as Python does for any script).
    assert err.count("Traceback") == (signum == signal.SIGINT), err
    # Nothing half-written may ever be read: no entry at all. Only a SIGKILLed run leaves its temporary
    # directory behind (nothing can run in a killed process); the next run removes it.
    left = sorted(p.name for p in cache.iterdir())
    assert not [name for name in left if ".tmp-" not in name]
    assert bool(left) == (signum == signal.SIGKILL), left

    args = DataArguments(data_path=str(big_data), data_cache_dir=str(cache), preprocessing_num_workers=2)
    again = prepare_data(args, sp, 1024)
    assert not again.report.from_cache and len(again.train_dataset) == again.report.train_examples == BIG_RECORDS
    assert [p.name for p in cache.iterdir()] == [Path(again.report.cache_dir).name]


def test_a_worker_killed_for_memory_is_one_line_not_a_hang(tmp_path, big_data):
    returncode, err = _interrupt_tokenizing(big_data, tmp_path / "cache", signal.SIGKILL, worker=True)
    assert returncode == 1 and err.strip().splitlines()[-1].endswith(
        "DataError: a tokenizing worker died (exit code -9; -9 is often the system out of memory): "
        "try fewer --preprocessing_num_workers"), err
    # No entry, no temporary directory: only the error for the node's waiting ranks.
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".error"]


def test_leftovers_of_other_hosts_and_live_processes_are_kept(sp, tmp_path):
    import socket

    live = f"{'0' * 32}.tmp-{socket.gethostname()}-{os.getppid()}-0123abcd"
    other_host = f"{'1' * 32}.tmp-another-node-{os.getpid() + 1_000_000}-0123abcd"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_local = f"{'2' * 32}.stale-{socket.gethostname()}-{dead.stdout.strip()}-0123abcd"
    old_style = f"{'3' * 32}.tmp-{dead.stdout.strip()}-0123abcd"  # named before the host was added
    for name in (live, other_host, dead_local, old_style):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.arrow").write_bytes(b"partial")
    prepared = prepare_data(DataArguments(data_path=str(FASTCHAT), data_cache_dir=str(tmp_path)), sp, 512)
    kept = sorted([live, other_host, Path(prepared.report.cache_dir).name])
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
