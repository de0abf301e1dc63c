"""Reading every supported format, and a clear message for every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from baichuan_finetune.data import records
from baichuan_finetune.data.records import ASSISTANT, USER, DataError, read_records

REPO = Path(__file__).resolve().parents[2]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"  # samples of ../shared/data (SOURCES.md)
EXAMPLES = REPO / "data" / "examples"


def write(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
        return str(path)
    for ascii_only in (False, True):  # a lone surrogate cannot be UTF-8: then it is written as a \u escape
        if name.endswith(".jsonl"):
            text = "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in content) + "\n"
        else:
            text = json.dumps(content, ensure_ascii=ascii_only)
        try:
            path.write_text(text, encoding="utf-8")
            break
        except UnicodeEncodeError:
            continue
    return str(path)


GOOD = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def test_examples_of_every_format():
    result = read_records(str(EXAMPLES))
    assert set(result.formats.values()) == {"sharegpt", "openai", "alpaca"}
    by_source = {c.source.split("/")[-1]: c for c in result.conversations}
    sys_first = by_source["sharegpt.jsonl line 1"]
    assert sys_first.system == "You are a concise assistant."
    assert sys_first.turns == [(USER, "Name three primary colors."), (ASSISTANT, "Red, yellow and blue.")]
    assert by_source["sharegpt.jsonl line 2"].system == "你是一个乐于助人的助手。"
    assert by_source["openai.jsonl line 1"].system == "You answer in one sentence."
    alpaca = by_source["alpaca.json record 2"]
    assert alpaca.turns[0] == (USER, "How do I say hello in French?")
    assert by_source["alpaca.json record 0"].turns[0][1].startswith("Summarize the sentence.\nThe quick")
    assert by_source["alpaca.json record 3"].system == "你是一位耐心的老师。"


def test_comma_separated_and_directory(tmp_path):
    a = write(tmp_path, "a.json", [GOOD])
    b = write(tmp_path, "b.jsonl", [GOOD, GOOD])
    assert len(read_records(f"{a},{b}").conversations) == 3
    assert len(read_records(str(tmp_path)).conversations) == 3


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("x.jsonl", '{"conversations": []}\n{"conversations": [\n', "x.jsonl line 2: invalid JSON at column"),
        ("x.json", '[{"conversations": [}]', "x.json: invalid JSON at line 1 column"),
        ("x.json", [GOOD, 5], "x.json record 1: record is a JSON number, expected an object"),
        ("x.jsonl", [GOOD, {"id": "b"}], "x.jsonl line 2: conversations: missing conversation field"),
        ("x.jsonl", [GOOD, {"conversations": []}], "x.jsonl line 2: conversations: empty conversation"),
        ("x.jsonl", [GOOD, {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
         "x.jsonl line 2: conversations[1].from: unknown role 'bot' (expected human, user, gpt, assistant or system)"),
        ("x.jsonl", [GOOD, {"conversations": [{"from": "human", "value": 3}]}],
         "x.jsonl line 2: conversations[0].value: text is a JSON number, expected a string"),
        ("x.jsonl", [GOOD, {"conversations": [{"from": "human"}]}], "x.jsonl line 2: conversations[0].value: missing text"),
        ("x.jsonl", [GOOD, {"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "s"}]}],
         "x.jsonl line 2: conversations[1].from: system message not in first place"),
        ("x.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}],
         "x.jsonl line 1: messages[1].role: unknown role 'tool' (expected system, user or assistant)"),
        ("x.jsonl", [{"messages": [{"role": "user"}]}], "x.jsonl line 1: messages[0].content: missing text"),
        ("x.json", [{"instruction": "a", "output": None}], "x.json record 0: output: missing text"),
        ("x.json", [{"instruction": "a", "output": "b", "history": [["only one"]]}],
         "x.json record 0: history[0]: expected a [user, assistant] pair"),
        # A lone surrogate (an unpaired "\ud800" escape: json.dumps writes it so) is no Unicode text.
        ("x.json", [GOOD, {"conversations": [{"from": "human", "value": "ab\ud800"}]}],
         "x.json record 1: conversations[0].value: invalid Unicode: lone surrogate U+D800 at character 2"),
        ("x.jsonl", [{**GOOD, "system": "\udc00"}], "x.jsonl line 1: system: invalid Unicode: lone surrogate U+DC00"),
        ("x.json", [{"instruction": "a", "output": "b", "history": [["q", "\udfff"]]}],
         "x.json record 0: history[0][1]: invalid Unicode"),
        ("x.jsonl", '{"conversations": []}\n{"conversations": ' + "[" * 5000 + "]" * 5000 + "}\n",
         "x.jsonl line 2: JSON nested too deeply for the JSON reader (more than 500 levels at column 518)"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert expected in str(err.value)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", "", "empty.jsonl: empty file"),
        ("blank.json", "  \n", "blank.json: empty file"),
        ("arr.json", "[]", "arr.json: empty file"),
        ("odd.jsonl", [{"question": "q", "answer": "a"}], "odd.jsonl: unknown format (first record keys: question, answer)"),
        ("splits.json", '{\n "train": [["a", "b"]],\n "test": []\n}', "splits.json: unknown format: the file is one JSON object"),
    ],
)
def test_file_level_errors(tmp_path, name, content, expected):
    with pytest.raises(DataError) as err:
        read_records(write(tmp_path, name, content))
    assert expected in str(err.value)


def test_unreadable_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file or directory"):
        read_records(str(tmp_path / "missing.json"))
    path = write(tmp_path, "locked.json", [GOOD])
    if os.geteuid() == 0:  # root reads mode-000 files: fail the open instead
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(records, "open", refuse, raising=False)
    os.chmod(path, 0)
    try:
        with pytest.raises(DataError, match="locked.json: cannot read file: Permission denied"):
            read_records(path)
    finally:
        os.chmod(path, 0o644)


def test_error_lists_first_20_and_count_skip_counts_by_reason(tmp_path):
    records = [GOOD] + [{"conversations": [{"from": "bot", "value": "x"}]}] * 25 + [{"conversations": []}] * 2
    path = write(tmp_path, "many.jsonl", records)
    with pytest.raises(DataError) as err:
        read_records(path)
    message = str(err.value)
    assert message.count("unknown role 'bot'") == 20
    assert "27 bad record(s)" in message and "... and 7 more" in message
    assert len(err.value.problems) == 27

    result = read_records(path, on_bad_record="skip")
    assert len(result.conversations) == 1
    reasons = {}
    for b in result.bad_records:
        reasons[b.reason] = reasons.get(b.reason, 0) + 1
    assert reasons == {"unknown role": 25, "empty conversation": 2}


def test_surrogate_pairs_are_text_and_lone_ones_are_skipped(tmp_path):
    emoji = {"conversations": [{"from": "human", "value": "\U0001F600"}, {"from": "gpt", "value": "ok"}]}
    lone = {"conversations": [{"from": "human", "value": "\ud83d"}, {"from": "gpt", "value": "ok"}]}
    path = write(tmp_path, "x.json", [emoji, lone])  # ASCII escapes: "\ud83d\ude00" and a lone "\ud83d"
    assert "\\ud83d\\ude00" in Path(path).read_text()
    result = read_records(path, on_bad_record="skip")
    assert [c.turns[0][1] for c in result.conversations] == ["\U0001F600"]
    assert [b.reason for b in result.bad_records] == ["invalid Unicode"]


def test_deep_nesting_in_a_json_array_names_the_record_line_and_column(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    path = write(tmp_path, "x.json", "[" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + ',\n{"id": ' + deep + "}]")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (f"{path} record 2: JSON nested too deeply for the JSON reader "
                              "(more than 500 levels at line 3 column 506)")
    # Brackets inside strings do not count.
    fine = {"conversations": [{"from": "human", "value": "[" * 600}, {"from": "gpt", "value": "{" * 600}]}
    assert len(read_records(write(tmp_path, "ok.json", [fine])).conversations) == 1


def test_one_bad_record_is_one_line_and_names_the_eval_data(tmp_path):
    path = write(tmp_path, "e.json", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(DataError) as err:
        read_records(path, what="eval data")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"1 bad record in the eval data: {path} record 0: ")
    with pytest.raises(DataError, match=r"^2 bad record\(s\) in the eval data"):
        read_records(write(tmp_path, "e2.json", [{"conversations": []}] * 2), what="eval data")


def test_same_role_twice_accepted(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                             {"from": "gpt", "value": "c"}]}
    assert read_records(write(tmp_path, "x.json", [rec])).conversations[0].turns[:2] == [(USER, "a"), (USER, "b")]


UNSUPPORTED = {
    "llamafactory_glaive_toolcall_zh_demo.json": "unknown role 'function_call'",
    "llamafactory_glaive_toolcall_en_demo.json": "unknown role 'function_call'",
    "cdial_lccc_toy_data.json": "unknown format: the file is one JSON object (keys: valid, train, test)",
    "fastchat_mt_bench_question.jsonl": "unknown format (first record keys: question_id",
    "chinese_vicuna_chat_sample.jsonl": "unknown format (first record keys: input, output",
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_fixture_files_give_clear_errors(name):
    path = FIXTURE_DATA / name
    with pytest.raises(DataError) as err:
        read_records(str(path))
    assert UNSUPPORTED[name] in str(err.value)
    assert str(path) in str(err.value)


def test_a_preference_pair_file_is_refused_for_supervised_training(tmp_path):
    pair = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"}}
    path = write(tmp_path, "pairs.json", [GOOD, pair])
    with pytest.raises(DataError) as err:
        read_records(path, on_bad_record="skip")
    assert str(err.value) == (f"{path} record 1: a preference pair ('chosen'/'rejected'), not a supervised "
                              "conversation: train on it with --stage dpo (docs/preference.md)")


def test_a_path_with_a_comma_is_one_file_when_it_exists(tmp_path):
    comma = write(tmp_path, "train,v2.json", [GOOD])
    assert len(read_records(comma).conversations) == 1
    a, b = write(tmp_path, "a.json", [GOOD]), write(tmp_path, "b.json", [GOOD])
    assert len(read_records(f"{a},{b}").conversations) == 2  # split: the whole is no path
    with pytest.raises(DataError) as err:
        read_records(f"{a},{tmp_path / 'nope.json'}")
    assert "nope.json: no such file or directory" in str(err.value) and "split at commas" in str(err.value)


def test_a_pipe_is_refused_in_one_line(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # what <(cat x.json) gives: /dev/fd/63, a pipe readable once
    with pytest.raises(DataError) as err:
        read_records(str(fifo))  # refused from its type: nothing opens (and blocks on) it
    message = str(err.value)
    assert message.startswith(f"{fifo}: not a regular file") and "process substitution" in message
    assert "\n" not in message


def openai_record(*weights) -> dict:
    """A user question and an assistant answer per weight (None: no weight key)."""
    messages = []
    for i, weight in enumerate(weights):
        messages.append({"role": "user", "content": f"q{i}"})
        messages.append({"role": "assistant", "content": f"a{i}"} | ({} if weight is None else {"weight": weight}))
    return {"messages": messages}


def test_openai_weight_marks_untrained_turns(tmp_path):
    path = write(tmp_path, "w.jsonl", [openai_record(0, 1, None), openai_record(1.0, 0.0)])
    first, second = read_records(path).conversations
    assert first.untrained_turns == (1,) and second.untrained_turns == (3,)  # indices into turns
    assert [t for t, _ in first.turns] == [USER, ASSISTANT] * 3


@pytest.mark.parametrize("record, expected", [
    (openai_record(0.5), "line 1: messages[1].weight: weight 0.5: expected 0 (not trained) or 1 (trained)"),
    (openai_record(True), "messages[1].weight: weight true: expected 0"),
    (openai_record("0"), 'messages[1].weight: weight "0": expected 0'),
    (openai_record(None) | {"messages": [{"role": "user", "content": "q", "weight": 0},
                                         {"role": "assistant", "content": "a"}]},
     "messages[0].weight: only assistant messages have a weight"),
])
def test_bad_weight_is_one_line_naming_record_and_field(tmp_path, record, expected):
    path = write(tmp_path, "w.jsonl", [record])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
