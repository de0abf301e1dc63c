"""Multiple-choice evaluation: prompt format, letter scoring, left-padded batches, layouts, LoRA."""

import json
import subprocess
import sys

import pytest
import torch
from tools_helpers import SCRIPTS, make_lora_dir, script_env

from baichuan_finetune import evaluate as ev


@pytest.fixture(scope="module")
def cmmlu_dir(shared_dir):
    path = shared_dir / "data" / "cmmlu_subset"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from baichuan_finetune.loading import load_model

    return load_model(tiny_model_dir, dtype="float32")


def test_reads_cmmlu_layout(cmmlu_dir):
    items = ev.read_items(cmmlu_dir / "dev" / "marketing.csv", ev.DEFAULT_COLUMNS)
    assert len(items) == 5
    assert items[0].question == "马斯洛需要层次理论中的最低层次是"
    assert items[0].options[3] == "生理需要" and items[0].answer == 3  # D
    assert ev.find_split(cmmlu_dir, None).name == "test"  # no val/ in CMMLU
    assert ev.subject_names(cmmlu_dir, "zh")["marketing"] == "市场营销"


def test_prompt_format_is_the_official_one(tiny):
    _, tokenizer = tiny
    shot = ev.Item("1+1=?", ("1", "2", "3", "4"), 1)
    item = ev.Item("2+2=?", ("4", "5", "6", "7 "), None)
    style = ev.PROMPT_STYLES["zh"]
    ids, dropped, truncated = ev.build_prompt_ids(tokenizer, "数学", [shot], item, style, 512)
    expected = ("以下是关于数学的单项选择题，请直接给出正确答案的选项。\n\n"
                "题目：1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
                "题目：2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：")
    assert tokenizer.decode(ids) == expected
    assert (dropped, truncated) == (0, False)
    # Too long for the context: shots are dropped first, then the prompt is cut from the left.
    short = len(tokenizer.encode_plain_text(expected)) - 1
    ids, dropped, truncated = ev.build_prompt_ids(tokenizer, "数学", [shot], item, style, short)
    assert dropped == 1 and not truncated and tokenizer.decode(ids).startswith("以下是关于数学")
    ids, dropped, truncated = ev.build_prompt_ids(tokenizer, "数学", [shot], item, style, 10)
    assert len(ids) == 10 and truncated and tokenizer.decode(ids).endswith("答案：")


def test_letter_ids_follow_the_answer_cue(tiny):
    _, tokenizer = tiny
    ids = ev.letter_token_ids(tokenizer, ev.PROMPT_STYLES["zh"])
    assert [tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]


def test_left_padded_batches_score_like_single_prompts(tiny):
    model, tokenizer = tiny
    texts = ["题目：短\n答案：", "以下是关于测试的单项选择题。\n\n题目：一个长得多的问题，用来产生很多左侧填充。\nA. 甲\nB. 乙\n答案：",
             "题目：中等长度的问题\n答案："]
    prompts = [tokenizer.encode_plain_text(t) for t in texts]
    letters = ev.letter_token_ids(tokenizer, ev.PROMPT_STYLES["zh"])
    assert ev.score_prompts(model, prompts, letters, batch_size=3) == ev.score_prompts(model, prompts, letters, 1)
    # The logits themselves agree: left padding restarts positions and is masked.
    width = max(map(len, prompts))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        for row, p in enumerate(prompts):
            single = model(input_ids=torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(batched[row], single, atol=1e-5, rtol=1e-4)


def test_evaluate_cmmlu_subset(tiny, cmmlu_dir):
    model, tokenizer = tiny
    report = ev.evaluate_task(model, tokenizer, cmmlu_dir, shots=5, limit=6, batch_size=4,
                              subjects=["marketing", "computer_science"])
    assert set(report["subjects"]) == {"marketing", "computer_science"}
    for result in report["subjects"].values():
        assert result["total"] == 6 and 0 <= result["correct"] <= 6
        assert len(result["predictions"]) == 6 and set(result["predictions"]) <= set("ABCD")
    accuracies = [r["accuracy"] for r in report["subjects"].values()]
    assert report["average_accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert "average (over subjects)" in ev.format_table(report)


def test_mmlu_style_columns_and_index_answers(tiny, tmp_path):
    model, tokenizer = tiny
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        rows = ["Question,Opt1,Opt2,Opt3,Opt4,Label"] + [f"What is {i}+{i}?,{2*i},{i},0,1,{i % 4}" for i in range(4)]
        (tmp_path / split / f"arithmetic_{split}.csv").write_text("\n".join(rows) + "\n")
    columns = ev.parse_columns("question=Question,A=Opt1,B=opt2,C=OPT3,D=Opt4,answer=Label")
    report = ev.evaluate_task(model, tokenizer, tmp_path, shots=2, columns=columns, answer_format="index",
                              prompt_style="en")
    assert report["split"] == "test" and report["subjects"]["arithmetic"]["total"] == 4
    items = ev.read_items(tmp_path / "test" / "arithmetic_test.csv", columns, "index")
    assert [i.answer for i in items] == [0, 1, 2, 3]
    # Headerless files (original MMLU) by position.
    (tmp_path / "raw.csv").write_text("What?,a,b,c,d,C\n")
    positions = ev.parse_columns("question=0,A=1,B=2,C=3,D=4,answer=5")
    assert ev.read_items(tmp_path / "raw.csv", positions, header=False)[0].answer == 2
    with pytest.raises(ValueError, match="not A-D"):
        ev.read_items(tmp_path / "test" / "arithmetic_test.csv", columns, "letter")
    with pytest.raises(ValueError, match="bad --columns"):
        ev.parse_columns("prompt=Q")


def test_script_on_a_lora_directory(tiny_model_dir, cmmlu_dir, tmp_path):
    lora = make_lora_dir(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "evaluate.py"), "--model", str(lora), "--task_dir", str(cmmlu_dir),
         "--shots", "5", "--limit", "4", "--subjects", "marketing,chinese_food_culture", "--output_json", str(out)],
        env=script_env(), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "average (over subjects)" in result.stdout and "marketing" in result.stdout
    report = json.loads(out.read_text())
    assert report["shots"] == 5 and report["questions"] == 8 and report["model"] == str(lora)


def test_real_tokenizer_letters(tiny_real_vocab_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_real_vocab_model_dir))
    for style in ev.PROMPT_STYLES.values():
        ids = ev.letter_token_ids(tokenizer, style)
        assert [tokenizer.decode([i]).strip() for i in ids] == ["A", "B", "C", "D"]
