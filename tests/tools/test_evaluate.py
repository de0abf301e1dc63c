"""Multiple-choice evaluation: prompt format, letter scoring, left-padded batches, layouts, LoRA."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tools_helpers import SCRIPTS, make_lora_dir, script_env

from baichuan_finetune.evaluation import multiple_choice as mc
from baichuan_finetune.tools import evaluate as ev


@pytest.fixture(scope="module")
def cmmlu_dir(fixtures_dir):
    """CMMLU's layout (dev/ + test/, ``,Question,A,B,C,D,Answer``) with questions written for these tests."""
    return fixtures_dir / "multiple_choice" / "cmmlu_layout"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from baichuan_finetune.tools.loading import load_model

    return load_model(tiny_model_dir, dtype="float32")


def test_reads_cmmlu_layout(cmmlu_dir):
    items = mc.read_items(cmmlu_dir / "dev" / "marketing.csv", mc.DEFAULT_COLUMNS)
    assert len(items) == 5
    assert items[0].question == "市场营销组合4P中不包括下列哪一项"
    assert items[0].options[3] == "人员" and items[0].answer == 3  # D
    assert mc.find_split(cmmlu_dir, None).name == "test"  # no val/ in CMMLU
    assert mc.subject_names(cmmlu_dir, "zh")["marketing"] == "市场营销"


def test_prompt_format_is_the_official_one(tiny):
    _, tokenizer = tiny
    shot = mc.Item("1+1=?", ("1", "2", "3", "4"), 1)
    item = mc.Item("2+2=?", ("4", "5", "6", "7 "), None)
    style = mc.PROMPT_STYLES["zh"]
    ids, dropped, truncated = mc.build_prompt_ids(tokenizer, "数学", [shot], item, style, 512)
    expected = ("以下是关于数学的单项选择题，请直接给出正确答案的选项。\n\n"
                "题目：1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
                "题目：2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：")
    assert tokenizer.decode(ids) == expected
    assert (dropped, truncated) == (0, False)
    # Too long for the context: shots are dropped first, then the prompt is cut from the left.
    short = len(tokenizer.encode_plain_text(expected)) - 1
    ids, dropped, truncated = mc.build_prompt_ids(tokenizer, "数学", [shot], item, style, short)
    assert dropped == 1 and not truncated and tokenizer.decode(ids).startswith("以下是关于数学")
    ids, dropped, truncated = mc.build_prompt_ids(tokenizer, "数学", [shot], item, style, 10)
    assert len(ids) == 10 and truncated and tokenizer.decode(ids).endswith("答案：")


def test_letter_ids_follow_the_answer_cue(tiny):
    _, tokenizer = tiny
    ids = mc.letter_token_ids(tokenizer, mc.PROMPT_STYLES["zh"])
    assert [tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]


def test_left_padded_batches_score_like_single_prompts(tiny):
    model, tokenizer = tiny
    texts = ["题目：短\n答案：", "以下是关于测试的单项选择题。\n\n题目：一个长得多的问题，用来产生很多左侧填充。\nA. 甲\nB. 乙\n答案：",
             "题目：中等长度的问题\n答案："]
    prompts = [tokenizer.encode_plain_text(t) for t in texts]
    letters = mc.letter_token_ids(tokenizer, mc.PROMPT_STYLES["zh"])
    assert mc.score_prompts(model, prompts, letters, batch_size=3) == mc.score_prompts(model, prompts, letters, 1)
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
    report = mc.evaluate_task(model, tokenizer, cmmlu_dir, shots=5, limit=6, batch_size=4,
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
    columns = mc.parse_columns("question=Question,A=Opt1,B=opt2,C=OPT3,D=Opt4,answer=Label")
    report = mc.evaluate_task(model, tokenizer, tmp_path, shots=2, columns=columns, answer_format="index",
                              prompt_style="en")
    assert report["split"] == "test" and report["subjects"]["arithmetic"]["total"] == 4
    items = mc.read_items(tmp_path / "test" / "arithmetic_test.csv", columns, "index")
    assert [i.answer for i in items] == [0, 1, 2, 3]
    # Headerless files (original MMLU) by position.
    (tmp_path / "raw.csv").write_text("What?,a,b,c,d,C\n")
    positions = mc.parse_columns("question=0,A=1,B=2,C=3,D=4,answer=5")
    assert mc.read_items(tmp_path / "raw.csv", positions, header=False)[0].answer == 2
    with pytest.raises(ValueError, match="not A-D"):
        mc.read_items(tmp_path / "test" / "arithmetic_test.csv", columns, "letter")
    with pytest.raises(ValueError, match="bad --columns"):
        mc.parse_columns("prompt=Q")


def test_script_on_a_lora_directory(tiny_model_dir, cmmlu_dir, tmp_path):
    lora = make_lora_dir(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "evaluate.py"), "--model", str(lora), "--task_dir", str(cmmlu_dir),
         "--shots", "5", "--limit", "4", "--subjects", "marketing,chinese_food_culture", "--output_json", str(out),
         "--log_samples"],
        env=script_env(), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "average (over subjects)" in result.stdout and "marketing" in result.stdout
    results = json.loads(out.read_text())
    # lm-evaluation-harness's shape: results per subject task and the group, n-shot, n-samples, config.
    task = "cmmlu_layout_marketing"
    assert set(results["results"]) == {"cmmlu_layout", task, "cmmlu_layout_chinese_food_culture"}
    entry = results["results"][task]
    assert 0 <= entry["acc,none"] <= 1 and entry["acc_stderr,none"] >= 0
    p = entry["acc,none"]
    assert entry["acc_stderr,none"] == pytest.approx((p * (1 - p) / 3) ** 0.5)  # sample stdev / sqrt(n), n=4
    assert results["n-shot"][task] == 5 and results["n-samples"][task] == {"original": 4, "effective": 4}
    assert results["config"]["model_args"] == f"pretrained={lora}" and results["config"]["limit"] == 4
    assert results["group_subtasks"]["cmmlu_layout"] == sorted(set(results["results"]) - {"cmmlu_layout"})
    assert results["baichuan_finetune"]["questions"] == 8
    samples = [json.loads(line) for line in (tmp_path / f"samples_{task}.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0]["doc"]["question"] == "产品生命周期中销售增长最快的阶段是"
    assert samples[0]["target"] == "B" and samples[0]["prediction"] in "ABCD"
    assert sum(s["acc"] for s in samples) == pytest.approx(4 * p)


# ----- layouts detected without flags -----

QUESTIONS = [("What is 1+1?", ("2", "3", "4", "5"), 0), ("What is 2+2?", ("3", "4", "5", "6"), 1),
             ("What is 3+3?", ("5", "7", "6", "8"), 2), ("What is 4+4?", ("6", "7", "9", "8"), 3)]


def write_layout(root: Path, kind: str) -> Path:
    """A task folder (dev/ + val/ or test/) of the four questions in one of the common layouts."""
    split = "val" if kind == "ceval" else "test"
    for folder in ("dev", split):
        (root / folder).mkdir(parents=True)
        suffix = f"_{folder}" if kind in ("ceval", "mmlu_raw") else ""
        if kind == "ceval":  # C-Eval: id,question,A,B,C,D,answer[,explanation]
            rows = ["id,question,A,B,C,D,answer,explanation"] + [
                f"{i},{q},{','.join(o)},{'ABCD'[a]}," for i, (q, o, a) in enumerate(QUESTIONS)]
        elif kind == "mmlu_csv":  # HF MMLU exported to CSV: choice0..3 and an index answer
            rows = ["question,choice0,choice1,choice2,choice3,answer"] + [
                f"{q},{','.join(o)},{a}" for q, o, a in QUESTIONS]
        elif kind == "mmlu_raw":  # the original MMLU files: no header, a letter answer
            rows = [f"{q},{','.join(o)},{'ABCD'[a]}" for q, o, a in QUESTIONS]
        if kind.startswith("mmlu_json"):
            records = [{"question": q, "subject": "arithmetic", "choices": list(o),
                        "answer": a if kind == "mmlu_json" else "ABCD"[a]} for q, o, a in QUESTIONS]
            if kind == "mmlu_jsonl":
                (root / folder / "arithmetic.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
            else:
                (root / folder / "arithmetic.json").write_text(json.dumps(records))
        else:
            (root / folder / f"arithmetic{suffix}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("kind, detected, style", [
    ("ceval", "C-Eval CSV", "zh"), ("mmlu_csv", "MMLU CSV", "en"), ("mmlu_raw", "MMLU CSV (no header)", "en"),
    ("mmlu_json", "MMLU JSON", "en"), ("mmlu_jsonl", "MMLU JSON", "en")])
def test_common_layouts_need_no_flags(tiny, tmp_path, kind, detected, style):
    model, tokenizer = tiny
    root = write_layout(tmp_path / kind, kind)
    report = mc.evaluate_task(model, tokenizer, root, shots=2)
    result = report["subjects"]["arithmetic"]
    assert result["layout"] == detected and report["prompt_style"] == style
    assert result["targets"] == ["A", "B", "C", "D"] and result["total"] == 4
    assert result["questions"][2] == {"question": "What is 3+3?", "choices": ["5", "7", "6", "8"]}


def test_cmmlu_fixture_is_detected(cmmlu_dir):
    assert mc.detect_layout(cmmlu_dir / "test" / "marketing.csv").kind == "CMMLU CSV"


@pytest.mark.parametrize("header, expected", [
    ("question,A,B,C,D,answer,A", "ambiguous layout: a column name repeats"),
    ("prompt,opt1,opt2,opt3,opt4,label", "unknown multiple-choice layout (columns: 'prompt', 'opt1'"),
    ("question,A,B,C,D,choice0,choice1,choice2,choice3,answer", "unknown multiple-choice layout"),
])
def test_unknown_or_ambiguous_layout_fails_before_the_model_loads(tiny_model_dir, tmp_path, header, expected):
    for folder in ("dev", "test"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "x.csv").write_text(header + "\n" + ",".join(["1"] * len(header.split(","))) + "\n")
    with pytest.raises(mc.EvalDataError, match="unknown|ambiguous") as info:
        mc.detect_layout(tmp_path / "test" / "x.csv")
    assert expected in str(info.value) and str(tmp_path / "test" / "x.csv") in str(info.value)
    # The script says it in one line, before the model loads (no "Loading weights" progress).
    result = subprocess.run([sys.executable, str(SCRIPTS / "evaluate.py"), "--model", str(tiny_model_dir),
                             "--task_dir", str(tmp_path), "--shots", "0"],
                            env=script_env(), capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr
    assert "Loading weights" not in result.stderr + result.stdout


def test_json_layout_errors_name_the_record(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c"], "answer": 0}) + "\n")
    with pytest.raises(mc.EvalDataError, match=r"q.jsonl: record 1: choices must be a list of 4"):
        mc.read_json_items(path)
    path.write_text(json.dumps({"question": "q", "choices": list("abcd"), "answer": 7}) + "\n")
    with pytest.raises(mc.EvalDataError, match="answer 7 is not 0-3 or A-D"):
        mc.read_json_items(path)
    path.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(mc.EvalDataError, match="first record keys: prompt"):
        mc.detect_layout(path)


def test_real_tokenizer_letters(tiny_real_vocab_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_real_vocab_model_dir))
    for style in mc.PROMPT_STYLES.values():
        ids = mc.letter_token_ids(tokenizer, style)
        assert [tokenizer.decode([i]).strip() for i in ids] == ["A", "B", "C", "D"]


# ----- accuracy against an independent oracle -----

RIGGED = [("北京是哪个国家的首都", ("中国", "日本", "法国", "美国")), ("水的化学式是什么", ("CO2", "H2O", "O2", "NaCl")),
          ("一年有几个月", ("十", "十一", "十二", "十三")), ("太阳从哪边升起", ("东", "西", "南", "北")),
          ("三角形有几条边", ("两", "三", "四", "五")), ("What is 7 times 6?", ("42", "36", "48", "56")),
          ("哪种动物会飞", ("鱼", "猫", "鸟", "牛")), ("最大的海洋是", ("大西洋", "印度洋", "北冰洋", "太平洋")),
          ("Which is a colour?", ("table", "blue", "run", "seven")), ("光速大约是多少", ("三十万公里每秒", "一千米每秒", "声速", "零"))]
SHOT = ("1+1=?", ("1", "2", "3", "4"), "B")


def oracle_letters(model, tokenizer) -> list[str]:
    """The letter whose token has the largest logit after each rigged prompt, from one unpadded forward
    pass per prompt; the prompt text and the letter tokens are written out here, not taken from `ev`."""
    shot_q, shot_options, shot_answer = SHOT
    header = "以下是关于arith的单项选择题，请直接给出正确答案的选项。\n\n"
    shot = f"题目：{shot_q}\n" + "".join(f"{l}. {o}\n" for l, o in zip("ABCD", shot_options)) + f"答案：{shot_answer}\n\n"
    letters = []
    for question, options in RIGGED:
        prompt = header + shot + f"题目：{question}\n" + "".join(f"{l}. {o}\n" for l, o in zip("ABCD", options)) + "答案："
        ids = tokenizer.encode_plain_text(prompt)
        letter_ids = []
        for letter in "ABCD":  # the token the prompt grows by when the letter follows it
            longer = tokenizer.encode_plain_text(prompt + letter)
            assert longer[: len(ids)] == ids and len(longer) == len(ids) + 1
            letter_ids.append(longer[-1])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        letters.append("ABCD"[int(logits[letter_ids].argmax())])
    return letters


def test_accuracy_is_the_argmax_of_the_letter_logits(tiny, tmp_path):
    """Answers rigged from the oracle: the even questions right, the odd ones wrong, so the accuracy is
    known exactly; a scorer that ignores the model (always "A") or a shifted logit fails it."""
    model, tokenizer = tiny
    expected = oracle_letters(model, tokenizer)
    assert len(set(expected)) >= 2, expected  # else an always-the-same-letter scorer could not be told apart
    answers = [e if i % 2 == 0 else next(l for l in "DCBA" if l != e) for i, e in enumerate(expected)]
    for split, rows in (("dev", [(*SHOT[:2], SHOT[2])]), ("val", [(q, o, a) for (q, o), a in zip(RIGGED, answers)])):
        (tmp_path / split).mkdir()
        lines = ["id,question,A,B,C,D,answer"] + [f"{i},{q},{','.join(o)},{a}" for i, (q, o, a) in enumerate(rows)]
        (tmp_path / split / f"arith_{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = mc.evaluate_task(model, tokenizer, tmp_path, shots=1, batch_size=3)  # left-padded batches
    result = report["subjects"]["arith"]
    assert result["predictions"] == expected
    assert result["correct"] == (len(RIGGED) + 1) // 2 and result["accuracy"] == pytest.approx(0.5)
    assert report["overall_accuracy"] == pytest.approx(0.5)


def test_one_question_writes_valid_json(tiny_model_dir, tmp_path):
    """The standard error of one question is undefined: null, never a bare NaN (not JSON)."""
    script = importlib.util.spec_from_file_location("evaluate_script", SCRIPTS / "evaluate.py")
    module = importlib.util.module_from_spec(script)
    script.loader.exec_module(module)
    root = write_layout(tmp_path / "task", "ceval")
    out = tmp_path / "results.json"
    module.main(["--model", str(tiny_model_dir), "--task_dir", str(root), "--shots", "0", "--limit", "1",
                 "--output_json", str(out)])

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    results = json.loads(out.read_text(encoding="utf-8"), parse_constant=refuse)
    assert results["results"]["task_arithmetic"]["acc_stderr,none"] is None
    assert results["n-samples"]["task_arithmetic"]["effective"] == 1


@pytest.mark.parametrize("case, expected", [
    ("header_only", "arithmetic_val.csv: no questions (an empty or header-only file)"),
    ("csv_and_json", "two files for the subject 'arithmetic': arithmetic.json and arithmetic_val.csv"),
    ("dev_without_answers", "arithmetic_dev.csv: dev question 1 has no answer"),
    ("bad_mapping", "subject_mapping.json: unreadable (JSONDecodeError"),
    ("mapping_shape", "subject_mapping.json: subject 'arithmetic': expected a name or [english, chinese, ...]"),
])
def test_task_problems_are_refused_before_scoring(tiny, tmp_path, case, expected):
    """Each used to count as 0%, pick a file silently, or fail after loading (TypeError, JSONDecodeError)."""
    model, tokenizer = tiny
    root = write_layout(tmp_path / "task", "ceval")
    if case == "header_only":
        (root / "val" / "arithmetic_val.csv").write_text("id,question,A,B,C,D,answer,explanation\n")
    elif case == "csv_and_json":
        (root / "val" / "arithmetic.json").write_text(json.dumps([{"question": "q", "choices": list("abcd"), "answer": 0}]))
    elif case == "dev_without_answers":
        (root / "dev" / "arithmetic_dev.csv").write_text("id,question,A,B,C,D\n0,1+1?,2,3,4,5\n")
    elif case == "bad_mapping":
        (root / "subject_mapping.json").write_text('{"arithmetic": ["Arithmetic", "算术"],')
    else:
        (root / "subject_mapping.json").write_text('{"arithmetic": 7}')
    with pytest.raises(mc.EvalDataError) as info:
        mc.evaluate_task(model, tokenizer, root, shots=1)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
