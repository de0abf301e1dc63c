"""prepare_data: cache hits, one tokenizing process per node, splits, and errors before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from baichuan_finetune import preprocess
from baichuan_finetune.arguments import DataArguments, UsageError
from baichuan_finetune.preprocess import prepare_data
from baichuan_finetune.records import DataError

REPO = Path(__file__).resolve().parents[1]
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
    from baichuan_finetune import preprocess
    from baichuan_finetune.arguments import DataArguments, UsageError
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    prepared = preprocess.prepare_data(DataArguments(data_path=sys.argv[2], data_cache_dir=sys.argv[3]), sp, 1024)
    digest = hashlib.sha256(json.dumps(prepared.train_dataset.to_dict()).encode()).hexdigest()
    print(json.dumps({"from_cache": prepared.report.from_cache, "cache_dir": prepared.report.cache_dir,
                      "digest": digest, "rows": len(prepared.train_dataset)}))
    """
)


def test_two_processes_one_tokenizes(sp, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "fine-tune"))
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(TOKENIZER), str(FASTCHAT), str(tmp_path)],
                         env=dict(env, LOCAL_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (1, 0)  # the waiting rank starts first
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    waiting, main = outs
    # Only the main process wrote the entry; the waiting one read what it wrote, and nothing else was left.
    assert (main["from_cache"], waiting["from_cache"]) == (False, True)
    assert main["cache_dir"] == waiting["cache_dir"]
    assert [p.name for p in tmp_path.iterdir()] == [Path(main["cache_dir"]).name]
    assert main["digest"] == waiting["digest"] and main["rows"] == 100
