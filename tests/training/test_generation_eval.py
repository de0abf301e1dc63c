"""Watching the fine-tune while it trains: --eval_generation_file (answers, BLEU/ROUGE, a table) and
--eval_mc_dir (multiple-choice accuracy) at each evaluation, --max_mc_drop stopping a run that forgets;
in this process (full fine-tune) and on 2 processes under ZeRO-3 with LoRA.

The oracles are independent of the callbacks: the final model (the one the last evaluation saw) answers
each prompt alone with ``model.generate`` and scores each question alone with one unpadded forward.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tools_helpers import free_port

from baichuan_finetune.evaluation.metrics import text_metrics
from baichuan_finetune.training.train import main

REPO = Path(__file__).resolve().parents[2]
FINE_TUNE = REPO / "fine-tune" / "fine-tune.py"
BIN = Path(sys.executable).parent
MAX_NEW = 6
LETTERS = "ABCD"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("watch")


@pytest.fixture(scope="module")
def inputs(work: Path, fixtures_dir: Path) -> dict[str, Path]:
    records = json.loads((REPO / "data" / "quickstart.json").read_text(encoding="utf-8"))
    (work / "train.json").write_text(json.dumps(records[:16], ensure_ascii=False), encoding="utf-8")
    # Held-out conversations: the last assistant turn is the reference.
    (work / "held_out.json").write_text(json.dumps(records[100:106], ensure_ascii=False), encoding="utf-8")
    return {"train": work / "train.json", "held_out": work / "held_out.json",
            "mc": fixtures_dir / "multiple_choice" / "cmmlu_layout"}


def flags(model: Path, data: Path, out: Path, *extra: object) -> list[str]:
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--data_cache_dir", str(out.parent / "cache"), "--model_max_length", "128",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--val_size", "4",
            "--eval_strategy", "steps", "--eval_steps", "2", "--use_cpu", "True", "--disable_tqdm", "True",
            "--seed", "3", *map(str, extra)]


def mc_questions(task_dir: Path, limit: int) -> list[tuple[str, int]]:
    """(0-shot prompt text, answer index) of every subject's first `limit` test questions, written out here
    from the CSV files (not through evaluation.multiple_choice)."""
    import csv

    from baichuan_finetune.evaluation.multiple_choice import CMMLU_SUBJECTS_ZH

    out = []
    for path in sorted((task_dir / "test").glob("*.csv")):
        rows = list(csv.reader(path.open(encoding="utf-8")))[1 : limit + 1]
        for row in rows:
            _, question, a, b, c, d, answer = row[:7]
            text = (f"以下是关于{CMMLU_SUBJECTS_ZH[path.stem]}的单项选择题，请直接给出正确答案的选项。\n\n"
                    f"题目：{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案：")
            out.append((text, LETTERS.index(answer.strip())))
    return out


def oracle_accuracy(model, tokenizer, questions: list[tuple[str, int]]) -> float:
    """Percent right: one unpadded forward per question, the letter tokens that follow the cue."""
    right = 0
    for text, answer in questions:
        ids = tokenizer.encode_plain_text(text)
        letters = [tokenizer.encode_plain_text(text + letter)[-1] for letter in LETTERS]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        right += int(logits[letters].argmax()) == answer
    return 100.0 * right / len(questions)


def event_scalars(out: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((out / "runs").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    # A text summary is stored as a string tensor under "<tag>/text_summary".
    texts = {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


# ----- in this process: both flags, TensorBoard, against the oracles -----


HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def watched_run(tiny_model_dir, inputs, work, wandb_dir) -> Path:
    """Both flags on one run; wandb (offline, its run recorded in work/wandb_run) beside TensorBoard when it is
    installed."""
    from conftest import new_wandb_runs

    out = work / "watched"
    before = set(wandb_dir.rglob("offline-run-*"))
    try:
        # Two trackers need a config file (a flag takes one name).
        config = work / "trackers.json"
        config.write_text(json.dumps({"report_to": ["tensorboard", "wandb"] if HAS_WANDB else ["tensorboard"]}))
        code = main([str(config), *flags(tiny_model_dir, inputs["train"], out, "--max_steps", "4",
                      "--save_strategy", "no", "--learning_rate", "1e-3",
                      "--eval_generation_file", inputs["held_out"], "--eval_generation_samples", "5",
                      "--eval_generation_max_new_tokens", MAX_NEW, "--per_device_eval_batch_size", "3",
                      "--eval_mc_dir", inputs["mc"], "--eval_mc_shots", "0", "--eval_mc_limit", "4",
                      "--metric_for_best_model", "eval_rouge-l")])
    finally:
        (work / "wandb_run").write_text("\n".join(map(str, new_wandb_runs(wandb_dir, before))))
    assert code == 0
    return out


def test_scalars_reach_tensorboard(watched_run):
    scalars, texts = event_scalars(watched_run)
    for tag in ("eval/bleu-4", "eval/rouge-1", "eval/rouge-2", "eval/rouge-l", "eval/exact_match",
                "eval/mc_accuracy", "eval/loss"):
        assert [step for step, _ in scalars.get(tag, [])] == [2, 4], (tag, sorted(scalars))
    table = texts.get("eval/generation_samples", [])
    assert [step for step, _ in table] == [2, 4], sorted(texts)
    rows = [json.loads(line) for line in (watched_run / "eval_generations.jsonl").read_text().splitlines()]
    header, rule, *lines = table[-1][1].splitlines()
    assert header == "| id | prompt | reference | prediction | rouge-l |" and len(lines) == 5
    assert all(f"| {r['id']} | {' '.join(r['prompt'].split())} |" in line for r, line in zip(rows[5:], lines))
    state = json.loads((watched_run / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_mc_accuracy" in h] == [2, 4]
    # evaluate() returns them too: --metric_for_best_model can name one.
    assert state["best_metric"] == max(h["eval_rouge-l"] for h in state["log_history"] if "eval_rouge-l" in h)
    assert state["best_metric"] == pytest.approx(max(value for _, value in scalars["eval/rouge-l"]), abs=1e-4)


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (requirements-tools.txt)")
def test_wandb_gets_the_table(watched_run, work):
    runs = [Path(p) for p in (work / "wandb_run").read_text().splitlines()]
    assert len(runs) == 1, runs
    tables = sorted(runs[0].rglob("generation_samples_*.table.json"))
    assert len(tables) == 2, list(runs[0].rglob("*.json"))  # one per evaluation
    rows = [json.loads(line) for line in (watched_run / "eval_generations.jsonl").read_text().splitlines()]
    logged = [json.loads(path.read_text(encoding="utf-8")) for path in tables]
    assert all(table["columns"] == ["id", "prompt", "reference", "prediction", "rouge-l"] for table in logged)
    assert {tuple(row[:4]) for table in logged for row in table["data"]} == {
        (r["id"], r["prompt"], r["reference"], r["prediction"]) for r in rows}


def check_answers(model, tokenizer, rows: list[dict], held_out: Path, max_new_tokens: int) -> None:
    """Each row's prompt and reference are its conversation's last question and answer, and its prediction what
    `model` answers to that conversation alone (the chat template's ids, ``generate`` greedy with the chat config's repetition penalty)."""
    records = json.loads(held_out.read_text(encoding="utf-8"))
    for row in rows:
        turns = records[row["id"]]["conversations"]  # the id is the record's number in the file
        assert (row["prompt"], row["reference"]) == (turns[-2]["value"], turns[-1]["value"])
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in turns[:-1]]
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 repetition_penalty=model.generation_config.repetition_penalty)
        new = out[0, len(ids):].tolist()
        answer = new[: new.index(2)] if 2 in new else new
        assert row["prediction"] == tokenizer.decode(answer, skip_special_tokens=True), row
        assert row["finish_reason"] == ("stop" if 2 in new else "length")


def test_logged_figures_match_the_final_model(watched_run, inputs):
    """The last evaluation (step 4) saw the final model: its answers are the model's one-at-a-time greedy
    answers token for token, its BLEU/ROUGE are the metrics of those answers, its accuracy the oracle's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(watched_run, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(watched_run)
    rows = [json.loads(line) for line in (watched_run / "eval_generations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 5 + [4] * 5
    assert [r["id"] for r in rows[:5]] == [r["id"] for r in rows[5:]]  # the same sample at every evaluation
    last = [r for r in rows if r["step"] == 4]
    check_answers(model, tokenizer, last, inputs["held_out"], MAX_NEW)
    history = json.loads((watched_run / "trainer_state.json").read_text())["log_history"]
    logged = next(h for h in history if h.get("step") == 4 and "eval_rouge-l" in h)
    expected = text_metrics([r["prediction"] for r in last], [r["reference"] for r in last])["mean"]
    assert logged["eval_bleu-4"] == pytest.approx(expected["bleu-4"], abs=1e-3)
    assert logged["eval_rouge-l"] == pytest.approx(expected["rouge-l"], abs=1e-3)
    accuracy = next(h for h in history if h.get("step") == 4 and "eval_mc_accuracy" in h)["eval_mc_accuracy"]
    assert accuracy == pytest.approx(oracle_accuracy(model, tokenizer, mc_questions(inputs["mc"], 4)), abs=1e-6)


# ----- --max_mc_drop: a run taught the wrong letters stops, keeping the last good checkpoint -----


def letter_of(model, tokenizer, text: str) -> str:
    """The letter with the largest logit after `text` (one unpadded forward)."""
    ids = tokenizer.encode_plain_text(text)
    letters = [tokenizer.encode_plain_text(text + letter)[-1] for letter in LETTERS]
    with torch.no_grad():
        return LETTERS[int(model(input_ids=torch.tensor([ids])).logits[0, -1][letters].argmax())]


def rigged_task(model_dir: Path, root: Path) -> tuple[Path, Path]:
    """A C-Eval-layout task whose answers are the base model's own predictions, and two training files
    of its questions as chat turns: one answering the right letters, one a wrong letter each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [("三", "五"), ("七", "二"), ("九", "四"), ("六", "八"), ("一", "十"), ("十二", "十一"), ("二十", "三十"),
             ("百", "千")]
    rows, right, wrong = [], [], []
    for i, (a, b) in enumerate(pairs):
        question, options = f"第{i}题：{a}和{b}哪个大", (a, b, "一样", "不知道")
        text = ("以下是关于quiz的单项选择题，请直接给出正确答案的选项。\n\n"
                f"题目：{question}\n" + "".join(f"{l}. {o}\n" for l, o in zip(LETTERS, options)) + "答案：")
        answer = letter_of(model, tokenizer, text)
        rows.append(f"{i},{question},{','.join(options)},{answer}")
        right.append({"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]})
        wrong.append({"conversations": [{"from": "human", "value": text},
                                        {"from": "gpt", "value": next(l for l in "DCBA" if l != answer)}]})
    (root / "val").mkdir(parents=True)
    (root / "val" / "quiz_val.csv").write_text("id,question,A,B,C,D,answer\n" + "\n".join(rows) + "\n",
                                               encoding="utf-8")
    files = root.parent / "right_letters.json", root.parent / "wrong_letters.json"
    for path, records in zip(files, (right, wrong)):
        path.write_text(json.dumps(records * 2, ensure_ascii=False), encoding="utf-8")
    return files


def test_max_mc_drop_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, work, capsys):
    """A model first taught the task's letters (wide margins, 100%), then taught wrong ones at a rate that
    takes a few steps to unlearn them: the run stops at the evaluation where accuracy fell > 20 points."""
    root = work / "rigged" / "quiz"
    right, wrong = rigged_task(tiny_model_dir, root)
    taught = work / "taught"
    long = ["--model_max_length", "512", "--lr_scheduler_type", "constant"]
    assert main(flags(tiny_model_dir, right, taught, "--max_steps", "6", *long, "--learning_rate", "3e-3",
                      "--save_strategy", "no", "--report_to", "none")) == 0
    capsys.readouterr()
    out = work / "forgetting"
    code = main(flags(taught, wrong, out, "--max_steps", "12", *long, "--learning_rate", "3e-4", "--save_steps", "2",
                      "--eval_on_start", "True", "--report_to", "none", "--eval_mc_dir", root, "--eval_mc_shots",
                      "0", "--max_mc_drop", "20"))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("fine-tune.py")]
    assert code == 1 and len(err) == 1, err
    line = err[0]
    assert "multiple-choice accuracy fell from 100.00% (step 0, the first evaluation)" in line, line
    failed = int(line.split("% at step ")[1].split(":")[0])
    assert f"more than --max_mc_drop 20; stopped without saving step {failed}" in line
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, f"stopped at step {failed}, before any checkpoint: the test needs an earlier good one"
    assert int(checkpoints[-1].name.split("-")[1]) == failed - 2  # the failing step saved nothing
    assert f"the last checkpoint evaluated before the drop: {checkpoints[-1]}" in line
    assert (checkpoints[-1] / "checkpoint_complete.json").is_file()
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()  # no final model


def test_the_guard_reads_the_history_so_a_resumed_run_keeps_its_first_evaluation(tmp_path):
    """A resumed run's log history (restored from its checkpoint) starts with the run's first evaluation;
    the checkpoint named is the newest one at or before the last evaluation within the limit (an
    unevaluated later one is not vouched for)."""
    from types import SimpleNamespace

    from baichuan_finetune.checkpoints import saving
    from baichuan_finetune.training.generation_eval import ForgettingDetected, check_forgetting

    for step in (2, 4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        saving.mark_checkpoint_complete(tmp_path / f"checkpoint-{step}", step)
    args = SimpleNamespace(max_mc_drop=5.0, output_dir=str(tmp_path), learning_rate=1e-4)
    history = [{"step": 0, "eval_mc_accuracy": 60.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_mc_accuracy": 58.0},
               {"step": 4, "eval_mc_accuracy": 55.0}]  # 5 points below: still within the limit
    check_forgetting(history, args)
    history.append({"step": 6, "eval_mc_accuracy": 54.5})
    with pytest.raises(ForgettingDetected) as info:
        check_forgetting(history, args)
    assert str(info.value).startswith("multiple-choice accuracy fell from 60.00% (step 0, the first evaluation) "
                                      "to 54.50% at step 6: 5.50 points, more than --max_mc_drop 5; stopped "
                                      f"without saving step 6, the last checkpoint evaluated before the drop: "
                                      f"{tmp_path / 'checkpoint-4'}.")
    with pytest.raises(ForgettingDetected, match="no checkpoint was saved before the drop"):
        check_forgetting([{"step": 1, "eval_mc_accuracy": 60.0}, {"step": 2, "eval_mc_accuracy": 10.0}], args)


# ----- 2 processes, ZeRO-3, LoRA -----


def test_two_process_zero3_lora_logs_both(tiny_model_dir, inputs, work):
    out = work / "zero3-lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    hostfile = work / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [BIN / "deepspeed", f"--hostfile={hostfile}", "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", free_port(), FINE_TUNE,
           *flags(tiny_model_dir, inputs["train"], out, "--max_steps", "2", "--save_strategy", "no",
                  "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "tensorboard",
                  "--use_lora", "True", "--lora_r", "4", "--deepspeed", REPO / "ds_config.json",
                  "--eval_generation_file", inputs["held_out"], "--eval_generation_samples", "3",
                  "--eval_generation_max_new_tokens", "4", "--eval_mc_dir", inputs["mc"], "--eval_mc_shots", "0",
                  "--eval_mc_limit", "1")]
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "dist_world_size=2" in proc.stdout + proc.stderr
    scalars, texts = event_scalars(out)
    assert [s for s, _ in scalars["eval/rouge-l"]] == [2] and [s for s, _ in scalars["eval/mc_accuracy"]] == [2]
    assert [step for step, _ in texts.get("eval/generation_samples", [])] == [2]
    rows = [json.loads(line) for line in (out / "eval_generations.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == 3 and ids == sorted(set(ids))  # a sample of 3 in file order, written once (main process)
    # Both ranks' shares back in input order: the saved adapter (the model of the step-2 evaluation)
    # gives each answer when asked alone.
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(out, dtype="float32")
    check_answers(model, tokenizer, rows, inputs["held_out"], 4)
