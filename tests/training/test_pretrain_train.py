"""--stage pt end to end on CPU (in this process, tiny model): a short run on C4 text lowers the held-out
perplexity that `eval --perplexity` measures (full and LoRA), the saved model takes SFT next (the two-stage
recipe), and a resumed pt run continues with the losses of an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from baichuan_finetune.cli.eval import main as eval_main
from baichuan_finetune.training.train import main as train_main

from conftest import FIXTURE_DATA

C4 = FIXTURE_DATA / "llamafactory_c4_demo.jsonl"  # 40 documents: 32 to train on, 8 held out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("pt")
    lines = C4.read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "train.jsonl").write_text("".join(lines[:32]), encoding="utf-8")
    (work / "held_out.jsonl").write_text("".join(lines[32:]), encoding="utf-8")
    return work / "train.jsonl", work / "held_out.jsonl"


def _flags(model: Path, data: Path, out: Path, *extra: object) -> list[str]:
    return ["--stage", "pt", "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--report_to", "none", "--model_max_length", "128", "--per_device_train_batch_size", "4",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "3", "--disable_tqdm", "True",
            *map(str, extra)]


def _perplexity(model: Path, data: Path, out: Path) -> dict:
    assert eval_main(["--model", str(model), "--perplexity", str(data), "--max_length", "128",
                      "--output_json", str(out)]) == 0
    return json.loads(out.read_text())


def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_pt_lowers_held_out_perplexity(method, corpus, tiny_model_dir, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BAICHUAN_FINETUNE_CACHE", str(tmp_path / "cache"))
    train, held_out = corpus
    out = tmp_path / method
    extra = ["--learning_rate", "2e-3"] if method == "full" else \
        ["--learning_rate", "5e-3", "--use_lora", "True", "--lora_r", "8", "--lora_target_modules", "all-linear"]
    assert train_main(_flags(tiny_model_dir, train, out, "--max_steps", 24, "--save_strategy", "no", *extra)) == 0
    before = _perplexity(tiny_model_dir, held_out, tmp_path / "before.json")
    after = _perplexity(out, held_out, tmp_path / "after.json")
    assert after["tokens"] == before["tokens"] > 1000 and after["documents"] == 8
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)
    if method == "full":  # the two-stage recipe: SFT starts from the pt output directory
        sft = tmp_path / "sft"
        data = tmp_path / "chat.json"
        data.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"q{i}"},
                                                       {"from": "gpt", "value": f"a{i}"}]} for i in range(8)]))
        assert train_main(["--model_name_or_path", str(out), "--data_path", str(data), "--output_dir", str(sft),
                           "--report_to", "none", "--model_max_length", "64", "--max_steps", "2",
                           "--save_strategy", "no", "--disable_tqdm", "True"]) == 0
        assert (sft / "model.safetensors").is_file()


def test_pt_resume_continues_the_same_run(corpus, tiny_model_dir, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BAICHUAN_FINETUNE_CACHE", str(tmp_path / "cache"))
    train, _ = corpus
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    flags = ["--max_steps", 6, "--save_steps", 3, "--learning_rate", "1e-3"]
    assert train_main(_flags(tiny_model_dir, train, whole, *flags)) == 0
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    assert train_main(_flags(tiny_model_dir, train, resumed, *flags, "--resume_from_checkpoint", "True")) == 0
    a, b = _losses(whole), _losses(resumed)  # the resumed history starts with the checkpoint's steps 1-3
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in (4, 5, 6)), (a, b)
