"""Multiple-choice questions (C-Eval / CMMLU / MMLU layouts) scored by answer-letter logits: reading the
files, building the k-shot prompts, scoring left-padded batches. ``baichuan-finetune eval``
(tools/evaluate.py) and the forgetting guard during training (training/generation_eval.py) use it.

For each question the prompt is the official-style one::

    以下是关于{subject}的单项选择题，请直接给出正确答案的选项。

    题目：{question}
    A. {A}
    ...
    答案：{answer}

    (k shots, from dev/) then the question with 答案：

and the prediction is the letter among A-D whose token has the largest logit at the last position.
Prompts longer than the model's context drop shots (last first), then are cut from the left.
Batches are left-padded (the model restarts positions after left padding via ``attention_mask``).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.json_files import JSONObjectError, read_json_object
from ..model.tokenization_baichuan import encode_text
from ..core.errors import DataFault

LETTERS = ("A", "B", "C", "D")
DEFAULT_COLUMNS = {"question": "question", "A": "A", "B": "B", "C": "C", "D": "D", "answer": "answer"}
PROMPT_STYLES = {
    "zh": {"header": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
           "question": "题目：{question}\n", "answer": "答案："},
    "en": {"header": "The following are multiple choice questions (with answers) about {subject}.\n\n",
           "question": "{question}\n", "answer": "Answer:"},
}
SPLIT_SUFFIXES = ("_dev", "_val", "_test")

# CMMLU subject names (its name_en2zh table); C-Eval ships subject_mapping.json, read when present.
CMMLU_SUBJECTS_ZH = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学", "astronomy": "天文学",
    "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试", "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策", "chinese_history": "中国历史",
    "chinese_literature": "中国文学", "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律", "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计", "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学", "construction_project_management": "建设工程管理",
    "economics": "经济学", "education": "教育学", "electrical_engineering": "电气工程", "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识", "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学", "ethnology": "民族学", "food_science": "食品科学", "genetics": "遗传学",
    "global_facts": "全球事实", "high_school_biology": "高中生物", "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理", "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治", "human_sexuality": "人类性行为", "international_law": "国际法学",
    "journalism": "新闻学", "jurisprudence": "法理学", "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学",
    "machine_learning": "机器学习", "management": "管理学", "marketing": "市场营销", "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学", "professional_accounting": "专业会计",
    "professional_law": "专业法学", "professional_medicine": "专业医学", "professional_psychology": "专业心理学",
    "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学", "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学", "world_history": "世界历史",
    "world_religions": "世界宗教",
}


class EvalDataError(ValueError, DataFault):
    """A question file that cannot be evaluated (bad answer, missing column, unreadable); one line."""


@dataclass
class Item:
    question: str
    options: tuple[str, str, str, str]
    answer: int | None  # index into LETTERS; None when the split has no answers


@dataclass
class SubjectResult:
    subject: str
    name: str
    total: int = 0
    correct: int = 0
    shots_dropped: int = 0  # prompts that did not fit with all k shots
    truncated: int = 0  # prompts cut from the left even with 0 shots
    predictions: list[str] = field(default_factory=list)
    items: list = field(default_factory=list)
    layout: str = ""
    shots: list = field(default_factory=list)  # the dev items shown before each question
    prompts: list[list[int]] = field(default_factory=list)  # the ids scored, one per item (`encode_task`)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def parse_columns(spec: str | None) -> dict[str, str]:
    """``"question=Question,A=A,...,answer=Answer"`` over the defaults; values may be 0-based positions."""
    columns = dict(DEFAULT_COLUMNS)
    if not spec:
        return columns
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in columns or not value.strip():
            raise ValueError(f"bad --columns entry {part!r}: expected KEY=COLUMN with KEY in {', '.join(columns)}")
        columns[key] = value.strip()
    return columns


def _answer_index(value: str, answer_format: str, where: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    if answer_format == "index":
        if value in ("0", "1", "2", "3"):
            return int(value)
    elif value.upper() in LETTERS:
        return LETTERS.index(value.upper())
    expected = "0-3" if answer_format == "index" else "A-D"
    raise EvalDataError(f"{where}: answer {value!r} is not {expected} (see --answer_format)")


def read_items(path: Path, columns: dict[str, str], answer_format: str = "letter", header: bool = True) -> list[Item]:
    """Questions of one CSV file; column names match case-insensitively (CMMLU's unnamed index is ignored)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: not a UTF-8 CSV file ({type(e).__name__}: {e})") from None
    if not rows:
        return []
    if header:
        names = [name.strip().lower() for name in rows[0]]
        rows = rows[1:]
    index = {}
    for key, column in columns.items():
        if column.isdigit():
            index[key] = int(column)
        elif not header:
            raise EvalDataError(f"{path}: without a header row, --columns must give positions (got {key}={column})")
        elif column.lower() in names:
            index[key] = names.index(column.lower())
        elif key == "answer":
            index[key] = None  # e.g. C-Eval test: no answers
        else:
            raise EvalDataError(f"{path}: no column {column!r} for {key} (columns: {', '.join(names)}); see --columns")
    items = []
    for n, row in enumerate(rows, start=2 if header else 1):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{n}"
        answer = None
        if index["answer"] is not None and index["answer"] < len(row):
            answer = _answer_index(row[index["answer"]], answer_format, where)
        needed = max(index[k] for k in ("question", *LETTERS))
        if needed >= len(row):
            raise EvalDataError(f"{where}: {len(row)} column(s), the question and options need {needed + 1}")
        items.append(Item(row[index["question"]], tuple(row[index[k]] for k in LETTERS), answer))
    return items


# ----- layouts: detected per file, so the common benchmarks need no layout flags -----

QUESTION_SUFFIXES = (".csv", ".json", ".jsonl")
MMLU_CHOICES = ("choice0", "choice1", "choice2", "choice3")


@dataclass(frozen=True)
class Layout:
    """How one question file is read: its kind, CSV columns (names or positions), answers, header."""

    kind: str  # "C-Eval CSV", "CMMLU CSV", "MMLU CSV", "MMLU CSV (no header)", "MMLU JSON"
    columns: dict = field(default_factory=lambda: dict(DEFAULT_COLUMNS), hash=False)
    answer_format: str = "letter"  # letter A-D | index 0-3 | auto (JSON: either)
    header: bool = True
    prompt_style: str = "zh"


def _json_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, list) else [data]


def detect_layout(path: Path) -> Layout:
    """The layout of one question file from its header or first record; `EvalDataError` (one line,
    naming the file and what was found) when it is none of the known ones or could be several."""
    path = Path(path)
    if path.suffix in (".json", ".jsonl"):
        records = _json_records(path)
        first = records[0] if records else {}
        keys = sorted(first) if isinstance(first, dict) else []
        if isinstance(first, dict) and "question" in first and isinstance(first.get("choices"), list):
            return Layout("MMLU JSON", answer_format="auto", prompt_style="en")
        raise EvalDataError(f"{path}: unknown multiple-choice layout (first record keys: {', '.join(keys) or 'none'}); "
                            "expected question, choices (a list of 4) and answer (index or letter)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: not a UTF-8 CSV file ({type(e).__name__}: {e})") from None
    names = [name.strip().lower() for name in first]
    found = ", ".join(repr(n) for n in first) or "none"
    letters = {"question", "a", "b", "c", "d"}
    if letters <= set(names) and not set(MMLU_CHOICES) & set(names):
        if len([n for n in names if n in letters | {"answer"}]) != len({n for n in names if n in letters | {"answer"}}):
            raise EvalDataError(f"{path}: ambiguous layout: a column name repeats (columns: {found}); use --columns")
        kind = "CMMLU CSV" if names and names[0] == "" else "C-Eval CSV"
        return Layout(kind)
    if "question" in names and set(MMLU_CHOICES) <= set(names) and not {"a", "b", "c", "d"} & set(names):
        columns = {"question": "question", **dict(zip(LETTERS, MMLU_CHOICES)), "answer": "answer"}
        return Layout("MMLU CSV", columns, answer_format="index", prompt_style="en")
    # The original MMLU files: no header, question, 4 options, answer letter.
    if len(first) == 6 and first[5].strip().upper() in LETTERS and "question" not in names:
        columns = {"question": "0", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "5"}
        return Layout("MMLU CSV (no header)", columns, header=False, prompt_style="en")
    raise EvalDataError(
        f"{path}: unknown multiple-choice layout (columns: {found}); expected C-Eval/CMMLU "
        "(question,A,B,C,D,answer), MMLU (question,choice0..choice3,answer index, or no header), or give --columns")


def read_json_items(path: Path) -> list[Item]:
    """Questions of an MMLU/HF-style JSON or JSONL file: ``question``, ``choices`` (4), ``answer`` (0-3 or A-D)."""
    items = []
    for n, record in enumerate(_json_records(path), start=1):
        where = f"{path}: record {n}"
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise EvalDataError(f"{where}: no question text")
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise EvalDataError(f"{where}: choices must be a list of 4 texts")
        value = record.get("answer")
        if value is None or value == "":
            answer = None
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
            answer = value
        elif isinstance(value, str) and value.strip().upper() in LETTERS:
            answer = LETTERS.index(value.strip().upper())
        elif isinstance(value, str) and value.strip() in ("0", "1", "2", "3"):
            answer = int(value.strip())
        else:
            raise EvalDataError(f"{where}: answer {value!r} is not 0-3 or A-D")
        items.append(Item(record["question"], tuple(choices), answer))
    return items


def read_task_file(path: Path, layout: Layout) -> list[Item]:
    """Questions of one file in `layout` (CSV or JSON)."""
    if layout.kind == "MMLU JSON":
        return read_json_items(path)
    return read_items(path, layout.columns, layout.answer_format, layout.header)


def file_layout(path: Path, columns: dict | None = None, answer_format: str | None = None,
                header: bool | None = None) -> Layout:
    """`detect_layout`, unless the layout flags (``--columns``/``--answer_format``/``--no_header``) say it."""
    if columns is None and answer_format is None and header is None:
        return detect_layout(path)
    return Layout("given by flags", columns or dict(DEFAULT_COLUMNS), answer_format or "letter",
                  True if header is None else header)


def question_files(folder: Path) -> dict[str, Path]:
    """Subject -> question file (CSV, JSON or JSONL) of one split folder; `EvalDataError` when two
    files give the same subject (``x.csv`` and ``x.json``, or ``x.csv`` and ``x_test.csv``): which
    one to evaluate is the user's choice, not ours."""
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*")):
        if path.suffix not in QUESTION_SUFFIXES or not path.is_file():
            continue
        subject = subject_of(path)
        if subject in files:
            raise EvalDataError(f"{folder}: two files for the subject {subject!r}: {files[subject].name} and "
                                f"{path.name}; keep one of them in {folder.name}/")
        files[subject] = path
    return files


def read_questions(path: Path, layout: Layout, limit: int | None = None) -> list[Item]:
    """The questions of `path` to evaluate (at most `limit`): `EvalDataError` when there are none (a
    header-only file would count as 0% in the average) or one has no answer (it cannot be scored)."""
    items = read_task_file(path, layout)[:limit]
    if not items:
        raise EvalDataError(f"{path}: no questions (an empty or header-only file); remove it or leave its subject "
                            "out with --subjects")
    if any(item.answer is None for item in items):
        raise EvalDataError(f"{path}: some questions have no answer; evaluate a split with answers (--split)")
    return items


def read_shots(path: Path, layout: Layout, shots: int) -> list[Item]:
    """The first `shots` questions of the dev file `path`, each with its answer (a shot shows it)."""
    items = read_task_file(path, layout)[:shots]
    if not items:
        raise EvalDataError(f"{path}: no questions for the {shots}-shot examples (an empty or header-only file); "
                            "use --shots 0 or fill it")
    missing = [n for n, item in enumerate(items, start=1) if item.answer is None]
    if missing:
        raise EvalDataError(f"{path}: dev question {missing[0]} has no answer ({len(missing)} of the first "
                            f"{len(items)}); the {shots}-shot examples need their answers (or use --shots 0)")
    return items


def subject_of(path: Path) -> str:
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def subject_names(task_dir: Path, style: str) -> dict[str, str]:
    """Display names for the header: C-Eval's subject_mapping.json, CMMLU's table, else the file name.

    ``subject_mapping.json`` maps each subject to a name or to C-Eval's ``[english, chinese, category]``;
    anything else raises `EvalDataError` naming the file (and the subject).
    """
    mapping = task_dir / "subject_mapping.json"
    if not mapping.exists():
        return dict(CMMLU_SUBJECTS_ZH) if style == "zh" else {}
    try:
        data = read_json_object(mapping, of=" of subject -> name", encoding="utf-8-sig")
    except JSONObjectError as e:
        raise EvalDataError(f"{mapping}: unreadable ({type(e.cause).__name__}: {e.cause})" if e.cause else str(e)) from None
    names = {}
    for subject, value in data.items():
        if isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value[:2]):
            names[subject] = value[1] if style == "zh" else value[0]
        elif isinstance(value, str):
            names[subject] = value
        else:
            raise EvalDataError(f"{mapping}: subject {subject!r}: expected a name or [english, chinese, ...], "
                                f"found {json.dumps(value, ensure_ascii=False)[:60]}")
    return names


def find_split(task_dir: Path, split: str | None) -> Path:
    if split:
        path = task_dir / split
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist")
        return path
    for name in ("val", "test"):
        if (task_dir / name).is_dir():
            return task_dir / name
    raise FileNotFoundError(f"{task_dir} has neither val/ nor test/ (the C-Eval/CMMLU layout)")


def format_question(item: Item, style: dict, with_answer: bool) -> str:
    text = style["question"].format(question=item.question.strip())
    text += "".join(f"{letter}. {option.strip()}\n" for letter, option in zip(LETTERS, item.options))
    text += style["answer"]
    if with_answer:
        text += ("" if style["answer"].endswith("：") else " ") + LETTERS[item.answer] + "\n\n"
    return text


def letter_token_ids(tokenizer, style: dict) -> list[int]:
    """Id of each answer letter as it follows the answer cue (``答案：A`` / ``Answer: A``)."""
    cue = style["answer"] + ("" if style["answer"].endswith("：") else " ")
    cue_ids = encode_text(tokenizer, cue)
    ids = []
    for letter in LETTERS:
        full = encode_text(tokenizer, cue + letter)
        if full[: len(cue_ids)] != cue_ids or len(full) != len(cue_ids) + 1:
            full = encode_text(tokenizer, letter)  # the letter merges with the cue: fall back to the bare letter
            if len(full) != 1:
                raise ValueError(f"answer letter {letter!r} is not one token in this vocabulary")
            ids.append(full[0])
        else:
            ids.append(full[-1])
    if len(set(ids)) != len(LETTERS):
        raise ValueError(f"answer letters do not map to distinct tokens: {ids}")
    return ids


def build_prompt_ids(tokenizer, subject_name: str, shots: list[Item], item: Item, style: dict, max_length: int):
    """Prompt ids (k shots, dropping the last shots while too long) and how many shots were dropped.

    Plain text in the chat format's safe encoding (``encode_text``): no bos, no role ids.
    """
    header = style["header"].format(subject=subject_name)
    question = format_question(item, style, with_answer=False)
    shot_texts = [format_question(shot, style, with_answer=True) for shot in shots]
    for k in range(len(shots), -1, -1):
        ids = encode_text(tokenizer, header + "".join(shot_texts[:k]) + question)
        if len(ids) <= max_length:
            return ids, len(shots) - k, False
    return ids[-max_length:], len(shots), True



@torch.no_grad()
def score_prompts(model, prompts: list[list[int]], letter_ids: list[int], batch_size: int = 8) -> list[int]:
    """Index of the highest-logit letter for each prompt; batches of similar length, left-padded.

    `model` may be a ``PeftModel`` (its ``config`` and ``device`` are its base model's). One forward per
    batch, ``ceil(len(prompts) / batch_size)`` in all: under ZeRO-3 every rank must make as many.
    """
    pad_id = model.config.pad_token_id or 0
    device = model.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    predictions = [0] * len(prompts)
    letters = torch.tensor(letter_ids, device=device)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = prompts[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       logits_to_keep=1, use_cache=False).logits[:, -1]
        choice = logits.index_select(-1, letters).argmax(-1).tolist()
        for row, i in enumerate(batch):
            predictions[i] = choice[row]
    return predictions


@dataclass
class Task:
    """A task directory read (`read_task`): one `SubjectResult` per subject with its items and shots;
    `encode_task` adds the prompt ids and the letter ids."""

    task_dir: Path
    split: str
    shots: int
    prompt_style: str
    files: dict[str, Path]
    results: list[SubjectResult]
    letter_ids: list[int] = field(default_factory=list)

    @property
    def questions(self) -> int:
        return sum(len(r.items) for r in self.results)


def read_task(
    task_dir: str | Path,
    shots: int = 5,
    split: str | None = None,
    subjects: list[str] | None = None,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
    answer_format: str | None = None,
    prompt_style: str | None = None,
    header: bool | None = None,
) -> Task:
    """Every question file of ``task_dir`` (``dev/`` + ``val/`` or ``test/``) read and checked.

    Each file's layout is detected (`detect_layout`) unless `columns`, `answer_format` or `header`
    is given; the prompt style follows the layout (zh for C-Eval/CMMLU, en for MMLU) unless given.
    Raises `EvalDataError` (a question file) or ``FileNotFoundError`` (a missing folder or file).
    """
    task_dir = Path(task_dir)
    split_dir = find_split(task_dir, split)
    files = question_files(split_dir)
    if subjects:
        missing = sorted(set(subjects) - set(files))
        if missing:
            raise FileNotFoundError(f"no {split_dir.name} file for subjects {', '.join(missing)}")
        files = {s: files[s] for s in subjects}
    if not files:
        raise FileNotFoundError(f"no question files (CSV, JSON, JSONL) in {split_dir}")
    layouts = {s: file_layout(p, columns, answer_format, header) for s, p in files.items()}
    prompt_style = prompt_style or next(iter(layouts.values())).prompt_style
    names = subject_names(task_dir, prompt_style)
    dev_files = question_files(task_dir / "dev") if shots else {}
    results = []
    for subject, path in files.items():
        items = read_questions(path, layouts[subject], limit)
        dev = []
        if shots:
            if subject not in dev_files:
                raise FileNotFoundError(f"{task_dir / 'dev'} has no file for {subject} ({shots}-shot needs one)")
            dev_path = dev_files[subject]
            dev = read_shots(dev_path, file_layout(dev_path, columns, answer_format, header), shots)
        results.append(SubjectResult(subject, names.get(subject, subject.replace("_", " ")), items=items,
                                     layout=layouts[subject].kind, total=len(items), shots=dev))
    return Task(task_dir, split_dir.name, shots, prompt_style, files, results)


def encode_task(task: Task, tokenizer, max_length: int) -> None:
    """The prompt ids of every question of `task` (at most `max_length` each) and the letters' ids."""
    style = PROMPT_STYLES[task.prompt_style]
    task.letter_ids = letter_token_ids(tokenizer, style)
    for result in task.results:
        result.prompts, result.shots_dropped, result.truncated = [], 0, 0
        for item in result.items:
            ids, dropped, truncated = build_prompt_ids(tokenizer, result.name, result.shots, item, style, max_length)
            result.prompts.append(ids)
            result.shots_dropped += dropped > 0
            result.truncated += truncated


def task_report(task: Task, seconds: float) -> dict:
    """Per-subject and average accuracy of a `Task` whose results hold their predictions."""
    results, total = task.results, task.questions
    return {
        "task_dir": str(task.task_dir),
        "split": task.split,
        "shots": task.shots,
        "prompt_style": task.prompt_style,
        "subjects": {
            r.subject: {"name": r.name, "accuracy": r.accuracy, "correct": r.correct, "total": r.total,
                        "shots_dropped": r.shots_dropped, "truncated": r.truncated, "predictions": r.predictions,
                        "layout": r.layout, "file": str(task.files[r.subject]),
                        "targets": [LETTERS[item.answer] for item in r.items],
                        "questions": [{"question": item.question, "choices": list(item.options)} for item in r.items]}
            for r in results
        },
        "average_accuracy": sum(r.accuracy for r in results) / len(results),  # mean over subjects
        "overall_accuracy": sum(r.correct for r in results) / total if total else 0.0,  # over questions
        "questions": total,
        "seconds": round(seconds, 2),
    }


def evaluate_task(
    model,
    tokenizer,
    task_dir: str | Path,
    shots: int = 5,
    split: str | None = None,
    subjects: list[str] | None = None,
    limit: int | None = None,
    columns: dict[str, str] | None = None,
    answer_format: str | None = None,
    prompt_style: str | None = None,
    batch_size: int = 8,
    header: bool | None = None,
    max_length: int | None = None,
) -> dict:
    """Per-subject and average accuracy of `model` on ``task_dir`` (`read_task`, `encode_task`, then
    `score_prompts`)."""
    started = time.perf_counter()
    task = read_task(task_dir, shots=shots, split=split, subjects=subjects, limit=limit, columns=columns,
                     answer_format=answer_format, prompt_style=prompt_style, header=header)
    encode_task(task, tokenizer, max_length or model.config.model_max_length)
    for result in task.results:
        predictions = score_prompts(model, result.prompts, task.letter_ids, batch_size)
        result.correct = sum(p == item.answer for p, item in zip(predictions, result.items))
        result.predictions = [LETTERS[p] for p in predictions]
    return task_report(task, time.perf_counter() - started)
