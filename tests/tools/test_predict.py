"""baichuan-finetune predict: a LoRA fine-tune's answers beat its base model's on the data it learned;
base, adapter and merged model compared in one report (Markdown and an offline HTML page, rendered in
headless Chromium); two worker processes write the same files as one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from baichuan_finetune.cli.predict import main as predict_main
from baichuan_finetune.evaluation.prompts import chat_prompt_ids, read_prompts
from baichuan_finetune.model.tokenization_baichuan import encode_text

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = REPO_ROOT / "data" / "quickstart.json"
# Screenshots of the rendered report: kept after the run (ignored by git), or where TEST_ARTIFACTS_DIR says.
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO_ROOT / ".cache" / "test-artifacts"))
MAX_NEW = 16


def quickstart_prompts(path: Path, count: int = 6) -> Path:
    """The first `count` single-question conversations of the quickstart data, as a held-out file."""
    single = [r for r in json.loads(QUICKSTART.read_text()) if len(r["conversations"]) == 2][:count]
    path.write_text(json.dumps(single, ensure_ascii=False))
    return path


def train_lora(base_dir: Path, prompts_file: Path, out: Path, steps: int = 60) -> Path:
    """A short LoRA fine-tune of the tiny model on the prompts' reference answers (the supervised
    answer tokens only, as training does), saved as an adapter directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    rows = []
    for prompt in read_prompts(prompts_file):
        ids = chat_prompt_ids(model.config.model_max_length, tokenizer, prompt.messages, MAX_NEW)
        answer = encode_text(tokenizer, prompt.reference) + [tokenizer.eos_token_id]
        rows.append((ids + answer, [-100] * len(ids) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(ids) for ids, _ in rows])[:, None]).long()
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.5, loss.item()  # it learned the answers
    peft_model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)  # as training writes it
    config_path.write_text(json.dumps(config))
    return out


def merge(adapter: Path, out: Path) -> Path:
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(adapter, dtype="float32")
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    """base, LoRA fine-tune and merged fine-tune compared on 6 quickstart prompts (greedy)."""
    work = tmp_path_factory.mktemp("predict")
    prompts = quickstart_prompts(work / "held_out.json")
    lora = train_lora(tiny_model_dir, prompts, work / "lora")
    merged = merge(lora, work / "merged")
    out = work / "out"
    code = predict_main(["--model", str(tiny_model_dir), "--model", str(lora), "--model", str(merged),
                         "--data", str(prompts), "--output_dir", str(out), "--greedy",
                         "--max_new_tokens", str(MAX_NEW)])
    assert code == 0
    return {"out": out, "prompts": prompts, "lora": lora, "labels": ["rope", "lora", "merged"]}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_fine_tune_beats_its_base_and_merged_equals_adapter(compared):
    out = compared["out"]
    metrics = {label: json.loads((out / label / "metrics.json").read_text()) for label in compared["labels"]}
    base, lora = metrics["rope"]["mean"], metrics["lora"]["mean"]
    for name in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert lora[name] > base[name] + 20, (name, base, lora)
    rows = {label: read_rows(out / label / "predictions.jsonl") for label in compared["labels"]}
    prompts = read_prompts(compared["prompts"])
    for label, label_rows in rows.items():
        assert [r["id"] for r in label_rows] == list(range(len(prompts)))
        assert [r["prompt"] for r in label_rows] == [p.text for p in prompts]
        assert [r["reference"] for r in label_rows] == [p.reference for p in prompts]
        assert set(label_rows[0]) == {"id", "source", "prompt", "reference", "prediction", "new_tokens",
                                      "finish_reason"}
    # The fine-tune learned to stop: its answers end with eos, the base model's run to the limit.
    assert all(r["finish_reason"] == "stop" and r["new_tokens"] < MAX_NEW for r in rows["lora"])
    assert sum(r["prediction"] == r["reference"] for r in rows["lora"]) >= 4
    assert [r["prediction"] for r in rows["merged"]] == [r["prediction"] for r in rows["lora"]]
    # metrics.json's per-example scores are those of predictions.jsonl's rows.
    assert [e["id"] for e in metrics["lora"]["examples"]] == list(range(len(prompts)))
    assert metrics["lora"]["mean"]["exact_match"] == pytest.approx(
        100 * sum(r["prediction"].strip() == r["reference"].strip() for r in rows["lora"]) / len(prompts), abs=1e-3)


def test_markdown_report_lists_every_prompt_once_with_every_answer(compared):
    out = compared["out"]
    report = (out / "report.md").read_text(encoding="utf-8")
    rows = {label: read_rows(out / label / "predictions.jsonl") for label in compared["labels"]}
    sections = re.split(r"^## ", report, flags=re.M)[1:]
    assert len(sections) == len(rows["rope"])
    for i, section in enumerate(sections):
        assert section.startswith(f"{i}. {rows['rope'][i]['prompt']}\n")
        for label in compared["labels"]:
            answer = rows[label][i]["prediction"].replace("|", "\\|").replace("\n", "<br>")
            answer = answer.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            assert f"| {label} | {answer} |" in section
    table = report.split("\n## ")[0]
    assert all(f"| {label} (`" in table for label in compared["labels"])


def test_html_report_renders_offline_in_chromium(compared, browser):
    out = compared["out"]
    page_html = (out / "report.html").read_text(encoding="utf-8")
    # Self-contained: nothing to fetch, nothing to run.
    assert not re.search(r"<script|<link|src=|https?://", page_html)
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto((out / "report.html").as_uri())
    table = page.locator("#metrics")
    assert table.is_visible()
    assert page.locator("#metrics tbody tr").count() == 3
    header = page.locator("#metrics thead th").all_inner_texts()
    assert header[:6] == ["model", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"]
    lora_row = page.locator("#metrics tbody tr").nth(1).locator("td").all_inner_texts()
    lora_metrics = json.loads((out / "lora" / "metrics.json").read_text())["mean"]
    assert lora_row[0] == "lora" and float(lora_row[1]) == pytest.approx(lora_metrics["bleu-4"], abs=0.01)
    # Every prompt once, each with one answer per model, the base model's differences highlighted.
    prompts = read_prompts(compared["prompts"])
    assert page.locator("section.prompt").count() == len(prompts)
    assert page.locator("section.prompt .answer").count() == 3 * len(prompts)
    assert page.locator("#prompt-0 .answer[data-model='rope'] mark").count() > 0
    assert page.locator("#prompt-0 .answer[data-model='rope'] mark").first.is_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "predict-report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert requests == [(out / "report.html").as_uri()]  # the page itself, nothing else
    page.close()


def test_two_processes_write_the_same_files_as_one(compared, tmp_path):
    args = ["--model", str(compared["lora"]), "--data", str(compared["prompts"]), "--greedy",
            "--max_new_tokens", str(MAX_NEW), "--batch_size", "2"]
    assert predict_main([*args, "--output_dir", str(tmp_path / "one")]) == 0
    assert predict_main([*args, "--output_dir", str(tmp_path / "two"), "--num_gpus", "2"]) == 0
    for name in ("predictions.jsonl", "metrics.json"):
        assert (tmp_path / "two" / "lora" / name).read_bytes() == (tmp_path / "one" / "lora" / name).read_bytes()
    # And batch size 2 answers as the module's batch of 16 did.
    assert (tmp_path / "one" / "lora" / "predictions.jsonl").read_bytes() == \
        (compared["out"] / "lora" / "predictions.jsonl").read_bytes()
