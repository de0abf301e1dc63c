"""The encoding equals a plain restatement of the official Baichuan2 rule, with the real tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from baichuan_finetune.data.encoding import encode_conversations
from baichuan_finetune.data.records import ASSISTANT, USER, Conversation, DataError, read_records
from baichuan_finetune.model.tokenization_baichuan import PlainTextEncoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKENIZER = FIXTURES / "baichuan2" / "tokenizer.model"
FORBIDDEN = {0, 1, 2, 195, 196}
ROLE_STRINGS = ("<reserved_106>", "<reserved_107>")

# Data samples (tests/fixtures/data) that hold conversations in a supported format, and how to read them plainly.
SUPPORTED = {
    "fastchat_dummy_conversation.json": "sharegpt",
    "chatglm_eft_oaast_sft_zh.json": "alpaca",
    "chatglm_eft_example_history.json": "alpaca",
    "llamafactory_identity.json": "alpaca",
}


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


def encode_conversation(sp, conversation: Conversation, model_max_length: int, truncation: str = "head"):
    """(input_ids, labels) of one conversation, or None if it is dropped."""
    examples = encode_conversations(sp, [conversation], model_max_length, truncation).examples()
    return examples[0] if examples else None


# ---- the rule, restated plainly -------------------------------------------------------------


def plain_ids(sp, text: str) -> list[int]:
    """sentencepiece ids of `text`; the role strings are spelled with byte pieces instead."""
    out: list[int] = []
    for part in re.split("(<reserved_106>|<reserved_107>)", text):
        if part in ROLE_STRINGS:
            out += [sp.piece_to_id(f"<0x{b:02X}>") for b in part.encode()]
        elif part:
            out += sp.encode(part)
    return out


def official(sp, turns: list[tuple[str, str]], system: str, max_len: int) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    if system:
        input_ids += plain_ids(sp, system)
        labels += [-100] * len(input_ids)
    for role, text in turns:
        value_ids = plain_ids(sp, text)
        if role == USER:
            input_ids += [195] + value_ids
            labels += [2] + [-100] * len(value_ids)
        else:
            input_ids += [196] + value_ids
            labels += [-100] + value_ids
    input_ids.append(2)
    labels.append(2)
    return input_ids[:max_len], labels[:max_len]


def plain_read(path: Path, fmt: str) -> list[tuple[list[tuple[str, str]], str]]:
    text = path.read_text(encoding="utf-8")
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    out = []
    for r in records:
        if fmt == "sharegpt":
            out.append(([(USER if m["from"] == "human" else ASSISTANT, m["value"]) for m in r["conversations"]], ""))
        else:
            turns = []
            for q, a in r.get("history") or []:
                turns += [(USER, q), (ASSISTANT, a)]
            q = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
            out.append((turns + [(USER, q), (ASSISTANT, r["output"])], r.get("system") or ""))
    return out


# ---- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SUPPORTED))
@pytest.mark.parametrize("max_len", [4096, 256])
def test_fixture_files_match_official_rule(sp, name, max_len):
    path = FIXTURES / "data" / name
    expected = []
    for turns, system in plain_read(path, SUPPORTED[name]):
        ids, labels = official(sp, turns, system, max_len)
        has_assistant = any(role == ASSISTANT for role, _ in turns)
        if has_assistant and any(x != -100 for x in labels[1:]):
            expected.append((ids, labels))
    chunk = encode_conversations(sp, read_records(str(path)).conversations, max_len)
    got = chunk.examples()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == e


EDGE_TEXTS = [
    "你好，世界！今天天气怎么样？",
    "Hello, world. How are you?",
    "emoji 😀👍🏽 and 🇨🇳 flags",
    "def f(x):\n\treturn x ** 2  # square\n",
    "   ",
    "\n\n",
    "x",
    "好",
    "",
    "long " * 3000,
    "<reserved_106>",
    "before<reserved_107>after",
    "<reserved_106><reserved_107><reserved_106>",
    "</s> <s> <unk>",
    "混合 mixed <reserved_107>中文",
    "<reserved_10",
]


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_edge_case_texts(sp, text):
    conv = Conversation(turns=[(USER, text), (ASSISTANT, text), (USER, "q"), (ASSISTANT, text)], system=text)
    got = encode_conversation(sp, conv, model_max_length=100_000)
    assert got == official(sp, conv.turns, conv.system, 100_000)
    ids = PlainTextEncoder(sp).encode([text])[0]
    assert not FORBIDDEN & set(ids), "data text produced a special id"
    assert sp.decode(ids) == text
    if not any(s in text for s in ROLE_STRINGS):
        assert ids == sp.encode(text)


def test_special_strings_in_turn_never_inject_ids(sp):
    conv = Conversation(turns=[(USER, "a<reserved_107>b"), (ASSISTANT, "<reserved_106>c</s>")])
    ids, labels = encode_conversation(sp, conv, 1000)
    assert [i for i, x in enumerate(ids) if x == 195] == [0]
    assert ids.count(196) == 1
    assert ids.count(2) == 1 and ids[-1] == 2


def test_whitespace_kept_exactly(sp):
    assert PlainTextEncoder(sp).encode([" hello  world\n\n"])[0] == sp.encode(" hello  world\n\n")
    assert sp.id_to_piece(sp.encode(" hello  world\n\n")) == ["▁hello", "▁", "▁world", "\n", "\n"]


def test_head_truncation_is_official(sp):
    turns = [(USER, "question " * 50), (ASSISTANT, "answer " * 50), (USER, "more"), (ASSISTANT, "end")]
    ids, labels = encode_conversation(sp, Conversation(turns=turns), 60)
    assert (ids, labels) == official(sp, turns, "", 60)
    assert len(ids) == 60 and ids[-1] != 2


def test_rounds_truncation_drops_whole_rounds(sp):
    turns = [(USER, "hi"), (ASSISTANT, "hello"), (USER, "long " * 100), (ASSISTANT, "x " * 100)]
    ids, labels = encode_conversation(sp, Conversation(turns=turns), 50, truncation="rounds")
    full, full_labels = official(sp, turns[:2], "", 10_000)
    assert (ids, labels) == (full, full_labels)
    # A first round that alone is too long falls back to the head cut.
    first = [(USER, "short"), (ASSISTANT, "x " * 100)]
    ids, labels = encode_conversation(sp, Conversation(turns=first), 50, truncation="rounds")
    assert (ids, labels) == official(sp, first, "", 50)


def test_examples_without_supervised_label_are_dropped_and_counted(sp):
    convs = [
        Conversation(turns=[(USER, "only a question")], source="a line 1"),
        Conversation(turns=[(USER, "word " * 100), (ASSISTANT, "cut away")], source="a line 2"),
        Conversation(turns=[(USER, "hi"), (ASSISTANT, "hello")], source="a line 3"),
    ]
    chunk = encode_conversations(sp, convs, 50)
    assert chunk.dropped == {"no assistant turn": 1, "no supervised label after truncation": 1}
    assert chunk.dropped_sources["no assistant turn"] == ["a line 1"]
    assert chunk.kept_index.tolist() == [2]
    assert chunk.num_truncated == 1


def test_same_role_twice_is_encoded_as_is(sp):
    turns = [(USER, "a"), (USER, "b"), (ASSISTANT, "c"), (ASSISTANT, "d")]
    assert encode_conversation(sp, Conversation(turns=turns), 100) == official(sp, turns, "", 100)


def test_empty_assistant_text_kept_like_official(sp):
    turns = [(USER, "a"), (ASSISTANT, ""), (USER, "b"), (ASSISTANT, "c")]
    assert encode_conversation(sp, Conversation(turns=turns), 100) == official(sp, turns, "", 100)


def test_text_that_cannot_be_encoded_safely_names_its_record():
    """Without byte pieces an unknown character can only become unk (0): bad data, with its source."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "hi there", "abc def"] * 20),
                                   model_writer=model, model_type="char", vocab_size=20, byte_fallback=False,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    good = Conversation(turns=[(USER, "hello"), (ASSISTANT, "world")], source="x.jsonl line 1")
    bad = Conversation(turns=[(USER, "hello"), (ASSISTANT, "w\u00f6rld")], source="x.jsonl line 2")
    assert len(encode_conversations(sp, [good], 100).examples()) == 1
    with pytest.raises(DataError, match=r"^x.jsonl line 2: text 'ö' would encode to special id 0"):
        encode_conversations(sp, [good, bad], 100)


def test_weight_zero_answers_are_not_trained(sp):
    """OpenAI's ``"weight": 0``: that answer's text and the eos that ends it carry no label; the labels
    here are written out by hand from the official layout."""
    q1, a1, q2, a2 = (plain_ids(sp, t) for t in ("first question", "ignored answer", "second", "kept answer"))
    ignore = [-100]
    turns = [(USER, "first question"), (ASSISTANT, "ignored answer"), (USER, "second"), (ASSISTANT, "kept answer")]
    ids, labels = encode_conversation(sp, Conversation(turns=turns, untrained_turns=(1,)), 1000)
    assert ids == [195, *q1, 196, *a1, 195, *q2, 196, *a2, 2]
    assert labels == [2, *ignore * len(q1), *ignore * (1 + len(a1)), *ignore, *ignore * len(q2), -100, *a2, 2]
    # The last answer untrained: the final eos is not learned either; the first one is.
    ids, labels = encode_conversation(sp, Conversation(turns=turns, untrained_turns=(3,)), 1000)
    assert labels == [2, *ignore * len(q1), -100, *a1, 2, *ignore * len(q2), *ignore * (1 + len(a2)), -100]
    # Rounds truncation that ends on an untrained answer adds an unlabelled eos.
    cut, cut_labels = encode_conversation(sp, Conversation(turns=turns + [(USER, "x " * 50), (ASSISTANT, "y")],
                                                           untrained_turns=(3,)), 40, truncation="rounds")
    assert cut == ids[:-1] + [2] and cut_labels == labels
    # Nothing left to learn: dropped and counted like any example without a supervised label.
    chunk = encode_conversations(sp, [Conversation(turns=turns, untrained_turns=(1, 3), source="w line 1")], 1000)
    assert chunk.dropped == {"no supervised label after truncation": 1}
