"""BaichuanTokenizer equals plain sentencepiece on the real vocabulary; the chat format agrees with training."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from baichuan_finetune.builder.tiny import collect_strings
from baichuan_finetune.model.tokenization_baichuan import ASSISTANT_ID, BaichuanTokenizer, PlainTextEncoder, build_chat_input

REPO = Path(__file__).resolve().parents[2]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


def file_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = json.loads(path.read_text(encoding="utf-8"))
    return collect_strings(records, [])


@pytest.fixture(scope="module")
def real(real_tokenizer_model):
    tok = BaichuanTokenizer.from_pretrained(real_tokenizer_model.parent)
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_model))
    return tok, sp


def test_official_tokenizer_config_loads_with_official_ids(real):
    tok, _ = real
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 0)
    assert tok.convert_ids_to_tokens([195, 196]) == ["<reserved_106>", "<reserved_107>"]
    assert len(tok) == 125696
    assert not tok.add_bos_token and not tok.add_eos_token


@pytest.mark.parametrize(
    "name",
    [
        "fastchat_dummy_conversation.json",
        "llamafactory_identity.json",
        "chinese_vicuna_chat_sample.jsonl",
        "chatglm_eft_oaast_sft_zh.json",
        "cdial_lccc_toy_data.json",
        "llamafactory_glaive_toolcall_zh_demo.json",
        "fastchat_mt_bench_question.jsonl",
        "llamafactory_glaive_toolcall_en_demo.json",
    ],
)
def test_encode_equals_sentencepiece_and_decode_round_trips(real, name):
    tok, sp = real
    texts = file_texts(FIXTURE_DATA / name)
    assert texts
    for text in texts:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text[:80]
        assert tok.decode(ids) == text


def test_special_token_text_is_plain_text(real):
    tok, sp = real
    text = "a</s>b<s>c<unk>d"
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert not {0, 1, 2} & set(ids)
    assert tok.decode(ids) == text


def test_plain_text_encoding_never_yields_role_ids(real):
    tok, sp = real
    text = "x<reserved_106>y<reserved_107>z"
    assert {195, 196} <= set(sp.encode(text))  # the raw sentencepiece model does inject them
    ids = tok.encode_plain_text(text)
    assert not {0, 1, 2, 195, 196} & set(ids)
    assert tok.decode(ids) == text
    plain = "no role text here, 你好"
    assert PlainTextEncoder(sp).encode([plain]) == [sp.encode(plain)]


def test_chat_and_training_encode_role_strings_alike(real):
    """Chat (tokenizer.encode_plain_text, one text) and training data (PlainTextEncoder, batched) agree."""
    tok, sp = real
    texts = ["<reserved_106>", "a<reserved_107>b<reserved_106>", "plain 你好 text", "</s> <s>", ""]
    assert PlainTextEncoder(sp).encode(texts) == [tok.encode_plain_text(t) for t in texts]


def test_chat_prompt_format_and_budget():
    class Tok:
        def encode_plain_text(self, text):
            return [ord(ch) for ch in text]

    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "aaaa"},
        {"role": "assistant", "content": "bbbb"},
        {"role": "user", "content": "cc"},
    ]
    model_max_length = 30
    ids = build_chat_input(Tok(), messages, model_max_length - 10)  # max_new_tokens 10: input budget 20
    s, a, b, c = ord("S"), ord("a"), ord("b"), ord("c")
    assert ids == [s, 195, a, a, a, a, 196, b, b, b, b, 195, c, c, 196]
    # Budget 12: the oldest round (10 tokens) no longer fits after system + newest round.
    assert build_chat_input(Tok(), messages, model_max_length - 18) == [s, 195, c, c, 196]
    # The newest round alone is longer than the budget: kept, then cut from the left.
    long = [{"role": "user", "content": "c" * 40}]
    assert build_chat_input(Tok(), long, model_max_length - 18) == ([c] * 11 + [196])


def test_chat_prompt_is_the_training_prefix(tiny_model_dir):
    """For each assistant turn of data/, the chat prompt of the messages before it is the training
    input up to that turn's first text token: a model is asked exactly as it was taught."""
    from baichuan_finetune.data.encoding import encode_conversations
    from baichuan_finetune.data.records import read_records

    tok = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    conversations = read_records(f"{REPO / 'data' / 'quickstart.json'},{REPO / 'data' / 'examples'}").conversations
    chunk = encode_conversations(tok.sp_model, conversations, 1_000_000)
    assert chunk.num_truncated == 0 and not chunk.dropped
    checked = 0
    for conv, (input_ids, _) in zip(conversations, chunk.examples()):
        messages = [{"role": "system", "content": conv.system}] if conv.system else []
        # Text never encodes to 196, so each 196 in the training input is an assistant turn's role token.
        assistant_starts = iter(i for i, x in enumerate(input_ids) if x == ASSISTANT_ID)
        for role, text in conv.turns:
            if role == "assistant":
                prefix = input_ids[: next(assistant_starts) + 1]
                assert tok.build_chat_input(messages) == prefix, conv.source
                checked += 1
            messages.append({"role": role, "content": text})
    assert checked >= len(conversations)
