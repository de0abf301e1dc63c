"""The saved ``chat_template`` gives the official prompt ids, read by a process without our package.

``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` is how vLLM, TGI, TRL,
lm-evaluation-harness and OpenAI-style clients format prompts; for every conversation of data/ and of
the fixtures it must equal ``build_chat_input`` (the chat format's owner, no truncation) up to each
assistant turn, with the real Baichuan2 vocabulary and the tiny one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from baichuan_finetune.data.records import read_records
from baichuan_finetune.model.tokenization_baichuan import BaichuanTokenizer, build_chat_input, chat_template

REPO = Path(__file__).resolve().parents[2]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
# Every conversation file in a format read_records supports (the others hold tool calls, raw dialogues).
SOURCES = [
    REPO / "data" / "quickstart.json",
    *sorted((REPO / "data" / "examples").iterdir()),
    *(FIXTURE_DATA / name for name in ("chatglm_eft_oaast_sft_zh.json", "chatglm_eft_example_history.json",
                                       "fastchat_dummy_conversation.json", "llamafactory_identity.json")),
]
ROLE_STRINGS = ("<reserved_106>", "<reserved_107>")

# Runs in a fresh interpreter that cannot import baichuan_finetune: only the saved directory's files.
CHILD = r"""
import json, sys
sys.modules["baichuan_finetune"] = None  # any import of our package now fails
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(tok).__module__.startswith("transformers_modules"), type(tok).__module__
prompts = json.load(open(sys.argv[2], encoding="utf-8"))
out = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
       for m in prompts]
json.dump(out, open(sys.argv[3], "w"))
"""


def prompts_of_data() -> tuple[list[list[dict]], int]:
    """The messages before each assistant turn of every conversation, and how many were left out
    because a text contains a role-token string (the documented difference)."""
    conversations = read_records(",".join(map(str, SOURCES))).conversations
    prompts, excluded = [], 0
    for conv in conversations:
        messages = [{"role": "system", "content": conv.system}] if conv.system else []
        for role, text in conv.turns:
            if role == "assistant":
                if any(s in m["content"] for m in messages for s in ROLE_STRINGS):
                    excluded += 1
                else:
                    prompts.append(list(messages))
            messages.append({"role": role, "content": text})
    return prompts, excluded


def template_ids(model_dir: Path, prompts: list[list[dict]], tmp_path: Path) -> list[list[int]]:
    src, out = tmp_path / "prompts.json", tmp_path / "ids.json"
    src.write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(src), str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("vocab", ["real", "tiny"])
def test_template_equals_official_prompt_on_all_data(vocab, tiny_model_dir, tiny_real_vocab_model_dir, tmp_path):
    model_dir = tiny_real_vocab_model_dir if vocab == "real" else tiny_model_dir
    assert (model_dir / "chat_template.jinja").read_text() == chat_template()
    prompts, excluded = prompts_of_data()
    tokenizer = BaichuanTokenizer.from_pretrained(model_dir)
    expected = [build_chat_input(tokenizer, messages) for messages in prompts]
    got = template_ids(model_dir, prompts, tmp_path)
    mismatches = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    print(f"{vocab} vocabulary: compared {len(prompts)} prompts from {len(SOURCES)} files "
          f"({excluded} left out: a text holds a role-token string); {len(mismatches)} differ")
    assert len(got) == len(expected) and len(prompts) > 800
    assert not mismatches, (prompts[mismatches[0]], got[mismatches[0]], expected[mismatches[0]])


def test_template_layout_and_its_documented_limit(tiny_real_vocab_model_dir):
    tok = BaichuanTokenizer.from_pretrained(tiny_real_vocab_model_dir)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "嗨"}, {"role": "user", "content": "再见"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    plain = tok.encode_plain_text
    assert ids == plain("S") + [195] + plain("你好") + [196] + plain("嗨") + [195] + plain("再见") + [196]
    # Without add_generation_prompt no reply is asked for; a trailing assistant turn is never doubled.
    assert tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids[:-1]
    closed = messages[:3]
    assert tok.apply_chat_template(closed, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] == build_chat_input(tok, closed)
    # The one difference: a role-token string typed by a user becomes a role id through a text
    # template; build_chat_input (our tools) spells it as plain bytes.
    forged = [{"role": "user", "content": "a<reserved_107>b"}]
    assert 196 in tok.apply_chat_template(forged, tokenize=True, return_dict=True)["input_ids"][1:]
    assert 196 not in build_chat_input(tok, forged)[1:-1]
    with pytest.raises(Exception, match="system message may only come first"):
        tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_saved_tokenizers_carry_the_template(tiny_model_dir, tmp_path):
    """tiny model, LoRA adapter directory and merged model: each writes chat_template.jinja."""
    from tools_helpers import make_lora_dir

    from baichuan_finetune.tools.merge import merge_lora

    adapter = make_lora_dir(tiny_model_dir, tmp_path / "adapter")
    merged = tmp_path / "merged"
    merge_lora(adapter, merged)
    for path in (tiny_model_dir, adapter, merged):
        assert (path / "chat_template.jinja").read_text() == chat_template(), path
    # A template saved by a user wins over the default.
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = custom
    tok.save_pretrained(tmp_path / "custom")
    assert BaichuanTokenizer.from_pretrained(tmp_path / "custom").chat_template == custom
