"""BaichuanTokenizer equals plain sentencepiece on the real vocabulary."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from baichuan_finetune.tiny import collect_strings
from baichuan_finetune.tokenization_baichuan import BaichuanTokenizer, encode_plain_texts


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
        "firefly_dummy_data.jsonl",
        "fastchat_mt_bench_question.jsonl",
        "llamafactory_glaive_toolcall_en_demo.json",
    ],
)
def test_encode_equals_sentencepiece_and_decode_round_trips(real, shared_dir, name):
    tok, sp = real
    texts = file_texts(shared_dir / "data" / name)
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
    assert encode_plain_texts(sp, [plain]) == [sp.encode(plain)]


def test_chat_and_training_encode_role_strings_alike(real):
    """Chat (tokenizer.encode_plain_text) and training data (encoding.TextEncoder) agree."""
    from baichuan_finetune.encoding import TextEncoder

    _, sp = real
    texts = ["<reserved_106>", "a<reserved_107>b<reserved_106>", "plain 你好 text", "</s> <s>", ""]
    assert TextEncoder(sp).encode(texts) == encode_plain_texts(sp, texts)
