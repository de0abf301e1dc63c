"""read_prompts: the three kinds of prompt file, the reference and context of a conversation, and bad
prompts named by file and record."""

import json

import pytest

from baichuan_finetune.data.records import DataError
from baichuan_finetune.evaluation.prompts import read_prompts


def test_conversation_last_assistant_turn_is_the_reference_and_earlier_turns_the_context(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                                  {"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"}]},
        {"conversations": [{"from": "human", "value": "Open question"}]},
    ]))
    first, second = read_prompts(path)
    assert first.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "1+1?"}]
    assert (first.text, first.reference, first.source) == ("1+1?", "2", f"{path} record 0")
    assert (second.text, second.reference) == ("Open question", None)


def test_alpaca_and_openai_formats(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate", "input": "猫", "output": "cat"}], ensure_ascii=False))
    openai = tmp_path / "openai.jsonl"
    openai.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}))
    [a] = read_prompts(alpaca)
    [o] = read_prompts(openai)
    assert (a.text, a.reference) == ("Translate\n猫", "cat")
    assert (o.messages, o.reference, o.source) == ([{"role": "user", "content": "Q"}], "A", f"{openai} line 1")


def test_prompt_records_and_text_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "北京在哪里？", "reference": "中国"}\n\n{"prompt": "Why?", "system": "S"}\n')
    first, second = read_prompts(jsonl)
    assert (first.text, first.reference, first.source) == ("北京在哪里？", "中国", f"{jsonl} line 1")
    assert second.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Why?"}]
    assert second.reference is None
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  \nsecond line\n")
    assert [(p.text, p.source) for p in read_prompts(text)] == [("first", f"{text} line 1"),
                                                                ("second line", f"{text} line 4")]


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", '{"prompt": ""}\n', "p.jsonl line 1: prompt: empty prompt"),
    ("p.jsonl", '{"prompt": "x", "answer": "y"}\n', "p.jsonl line 1: answer: unknown field"),
    ("p.jsonl", '{"prompt": 3}\n', "p.jsonl line 1: prompt: text is a JSON number"),
    ("c.json", json.dumps([{"conversations": [{"from": "gpt", "value": "only an answer"}]}]),
     "c.json record 0: no user turn to answer"),
    ("c.json", json.dumps([{"conversations": [{"from": "human", "value": " "}]}]), "c.json record 0: empty prompt"),
    ("e.txt", "\n\n", "e.txt: no prompts"),
])
def test_bad_prompts_are_one_line_naming_the_record(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_prompts(path)
    assert message in str(error.value) and "\n" not in str(error.value)
