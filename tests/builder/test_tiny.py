"""The embedded tiny model: deterministic, official id layout, chat works (also streamed)."""

import hashlib

from transformers import AutoModelForCausalLM, AutoTokenizer

from baichuan_finetune.model.configuration_baichuan import chat_generation_config
from baichuan_finetune.builder.tiny import make_tiny_model


def digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_build_is_deterministic_and_complete(tmp_path, tiny_model_dir):
    again = make_tiny_model(tmp_path / "again")
    assert digests(again) == digests(tiny_model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "generation_config.json", "modeling_baichuan.py", "configuration_baichuan.py",
                 "tokenization_baichuan.py", "specs_baichuan.py"):
        assert (tiny_model_dir / name).is_file(), name


def test_official_id_layout(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.convert_ids_to_tokens([0, 1, 2, 195, 196]) == ["<unk>", "<s>", "</s>", "<reserved_106>", "<reserved_107>"]
    text = "Hello, 你好!"
    assert tok.decode(tok.encode(text)) == text


def test_real_vocabulary_variant(tiny_real_vocab_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_real_vocab_model_dir)
    assert model.config.vocab_size == 125696
    assert AutoTokenizer.from_pretrained(tiny_real_vocab_model_dir).encode("你好") == [16829]


def test_chat_streams_the_same_reply(tiny_alibi_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_alibi_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_alibi_model_dir)
    greedy = chat_generation_config(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Zorbin?"}]
    reply = model.chat(tok, messages, generation_config=greedy)
    pieces = list(model.chat(tok, messages, stream=True, generation_config=greedy))
    assert pieces and pieces[-1] == reply
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
