"""scripts/inspect_data.py: statistics, preview, dump, and a clean error exit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from baichuan_finetune.data.encoding import encode_conversations
from baichuan_finetune.data.records import read_records

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "baichuan2"  # the real tokenizer (SOURCES.md)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("inspect_data", REPO / "scripts" / "inspect_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_statistics_preview_and_dump(script, tmp_path, capsys):
    data = REPO / "data" / "examples"
    dump = tmp_path / "out.jsonl"
    rc = script.main(["--data_path", str(data), "--tokenizer_path", str(TOKENIZER_DIR), "--model_max_length", "64",
                      "--dump", str(dump), "--data_cache_dir", str(tmp_path / "cache"), "--batch_size", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("records read: 12", "p50", "p99", "supervised:", "max_length", "longest (batch 4)", "packing",
                 "<assistant>: [[", "--- example 0"):
        assert text in out
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    expected = encode_conversations(sp, read_records(str(data)).conversations, 64).examples()
    dumped = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(d["input_ids"], d["labels"]) for d in dumped] == expected


def test_model_file_path_and_bad_data_exit_1(script, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "bot", "value": "x"}]}\n')
    rc = script.main(["--data_path", str(bad), "--tokenizer_path", str(TOKENIZER_DIR / "tokenizer.model"),
                      "--model_max_length", "64", "--data_cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "bad.jsonl line 1: conversations[0].from: unknown role 'bot'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--data_path", "", "--model_max_length", "64"], "error: --data_path: required"),
    (["--data_path", "x.json", "--model_max_length", "1"], "error: --model_max_length 1: must be at least 8"),
    # Training's own limit and choices (arguments.py), not a looser copy.
    (["--data_path", "x.json", "--model_max_length", "4"], "error: --model_max_length 4: must be at least 8"),
])
def test_bad_flags_exit_2_with_one_line(script, tmp_path, capsys, flags, message):
    rc = script.main(flags + ["--tokenizer_path", str(TOKENIZER_DIR), "--data_cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(message) and err.count("\n") == 1
