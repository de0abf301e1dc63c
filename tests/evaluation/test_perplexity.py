"""eval --perplexity: windows, the token-weighted NLL against a direct log-softmax, and the command's errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from baichuan_finetune.cli.eval import main as eval_main
from baichuan_finetune.evaluation.perplexity import perplexity, read_documents, windows


@pytest.mark.parametrize("length, max_length, stride", [(1, 8, None), (8, 8, None), (20, 8, None), (20, 8, 3),
                                                         (20, 8, 8), (21, 8, 1), (5, 8, 4)])
def test_windows_score_each_token_once(length, max_length, stride):
    scored = []
    for w in windows(length, max_length, stride):
        assert 0 <= w.begin < w.first_scored < w.end <= length and w.end - w.begin <= max_length
        scored += range(w.first_scored, w.end)
    assert len(scored) == len(set(scored))
    if stride is None or stride == max_length:  # chunked: each window's first token has no context
        assert sorted(scored) == [i for i in range(length) if i % max_length]
    else:  # sliding: all but the document's first token
        assert sorted(scored) == list(range(1, length))


def _direct_nll(model, documents, max_length, stride):
    """Sum of -log p(token) from full logits and log_softmax, window by window, one window at a time."""
    total, count = 0.0, 0
    for doc in documents:
        for w in windows(len(doc), max_length, stride):
            ids = torch.as_tensor(doc[w.begin:w.end].astype(np.int64))[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t in range(w.first_scored, w.end):
                total -= float(logp[t - w.begin - 1, int(doc[t])])
                count += 1
    return total, count


@pytest.mark.parametrize("stride", [None, 5])
def test_perplexity_is_the_token_weighted_nll(tiny_model_dir, tmp_path: Path, stride):
    from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM
    from baichuan_finetune.model.tokenization_baichuan import BaichuanTokenizer

    model = BaichuanForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    data = tmp_path / "d.txt"
    data.write_text("A short one.\nA much longer document that needs several windows of sixteen tokens each, "
                    "to see the windows at work.\n\nThird: 第三个文档。\n", encoding="utf-8")
    documents, empty = read_documents(str(data), BaichuanTokenizer.from_pretrained(tiny_model_dir))
    assert empty == 0 and len(documents) == 3
    result = perplexity(model, documents, max_length=16, stride=stride, batch_size=2)
    with torch.no_grad():
        nll, count = _direct_nll(model, documents, 16, stride)
    assert result.tokens == count
    assert result.nll == pytest.approx(nll / count, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_cli_writes_json_and_refuses_bad_input(tiny_model_dir, tmp_path: Path, capsys):
    data = tmp_path / "held.jsonl"
    data.write_text('{"text": "Some held-out text."}\n{"text": ""}\n', encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert eval_main(["--model", str(tiny_model_dir), "--perplexity", str(data), "--max_length", "32",
                      "--output_json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["documents"] == 1 and written["empty_documents"] == 1 and written["tokens"] > 0
    assert written["perplexity"] == pytest.approx(math.exp(written["nll"]))
    assert "perplexity of" in capsys.readouterr().out

    def fails(argv, code, message):
        with pytest.raises(SystemExit) as e:
            eval_main(["--model", str(tiny_model_dir), *argv])
        err = capsys.readouterr().err
        assert e.value.code == code and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err

    (tmp_path / "bin.txt").write_bytes(b"\x00\x01binary")
    fails(["--perplexity", str(tmp_path / "bin.txt")], 1, "bin.txt: a binary file")
    fails(["--perplexity", str(tmp_path / "nope.txt")], 1, "nope.txt: no such file or directory")
    fails([], 2, "give --task_dir (multiple choice) or --perplexity FILE")
    fails(["--perplexity", str(data), "--stride", "0"], 2, "--stride 0: expected a number >= 1")
