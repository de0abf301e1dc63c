"""scripts/cli_demo.py driven through a pseudo-terminal (pexpect) on a LoRA adapter directory."""

import sys

import pytest
from tools_helpers import SCRIPTS, generate_reply, make_lora_dir, require, script_env

MESSAGE = "你好，请介绍一下北京。"


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("cli") / "adapter")


def library_reply(model_dir, message: str, max_new_tokens: int) -> str:
    """The greedy reply the library gives for ``message`` (training chat format, LoRA active)."""
    from baichuan_finetune.tools.generation import make_generation_config
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(model_dir)
    return generate_reply(model, tokenizer, [{"role": "user", "content": message}],
                          make_generation_config(model, max_new_tokens=max_new_tokens, greedy=True)).text


@pytest.fixture(scope="module")
def expected_reply(lora_dir):
    return library_reply(lora_dir, MESSAGE, 16)


def spawn_cli(model_dir, *args):
    pexpect = require("pexpect", "the terminal test drives the demo through a pty (requirements-tools.txt)")
    child = pexpect.spawn(sys.executable, [str(SCRIPTS / "cli_demo.py"), "--model", str(model_dir), "--greedy", *args],
                          env=script_env(), encoding="utf-8", timeout=90, dimensions=(50, 400))
    child.expect_exact("User: ")
    return child


def ask(child, text: str) -> str:
    child.sendline(text)
    child.expect_exact("Baichuan 2: ")
    child.expect_exact("\r\n\r\nUser: ")
    return child.before.replace("\r\n", "\n")


def test_chat_stream_toggle_clear_and_exit(lora_dir, expected_reply):
    child = spawn_cli(lora_dir, "--max_new_tokens", "16")
    assert ask(child, MESSAGE) == expected_reply  # streamed, LoRA active, training format
    child.sendline("clear")
    child.expect_exact("(history cleared)")
    child.sendline("stream")
    child.expect_exact("(streaming off)")
    child.expect_exact("User: ")
    assert ask(child, MESSAGE) == expected_reply  # same prompt after clear: history is empty again
    child.sendline("stream")
    child.expect_exact("(streaming on)")
    child.expect_exact("User: ")
    child.sendline("第一行\\")
    child.expect_exact("... ")
    child.sendline("第二行")
    child.expect_exact("Baichuan 2: ")
    child.expect_exact("\r\n\r\nUser: ")
    child.sendline("exit")
    child.expect(require("pexpect", "").EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_generation_not_the_program(lora_dir):
    pexpect = require("pexpect", "")
    child = spawn_cli(lora_dir, "--max_new_tokens", "5000")  # long enough to interrupt
    child.sendline(MESSAGE)
    child.expect_exact("Baichuan 2: ")
    child.expect(r"\S{3}")  # some streamed text
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact("User: ")
    child.sendline("再说一遍")  # the program is still alive and answers (with the stopped reply in its history)
    child.expect_exact("Baichuan 2: ")
    child.expect(r"\S")
    child.sendintr()
    child.expect_exact("User: ", timeout=30)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_read_user_message_multiline():
    from baichuan_finetune.tools.chat_cli import read_user_message

    def feeder(lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_user_message(feeder(["a\\", "b\\", "c"])) == "a\nb\nc"
    assert read_user_message(feeder(['"""', "x", "", "y\\", '"""'])) == "x\n\ny\\"
    assert read_user_message(feeder(["plain"])) == "plain"


def test_base_model_directory_also_chats(tiny_model_dir):
    child = spawn_cli(tiny_model_dir, "--max_new_tokens", "8")
    assert ask(child, "hello") == library_reply(tiny_model_dir, "hello", 8)
    child.sendline("exit")
    child.expect(require("pexpect", "").EOF)


def test_generation_flag_limits():
    """The edges the terminal chat accepts (bad values are in tests/tools/test_tool_errors.py)."""
    import argparse

    from baichuan_finetune.tools.generation import check_generation_arguments

    def flags(**values):
        return argparse.Namespace(**{"max_new_tokens": None, "temperature": None, "top_p": None, **values})

    for ok in (flags(), flags(max_new_tokens=1, temperature=0.0, top_p=1.0), flags(temperature=1.5, top_p=1e-3)):
        check_generation_arguments(ok)
    for bad, flag in ((flags(max_new_tokens=0), "--max_new_tokens"), (flags(temperature=-0.1), "--temperature"),
                      (flags(top_p=0.0), "--top_p"), (flags(top_p=1.01), "--top_p"),
                      (flags(temperature=float("inf")), "--temperature")):
        with pytest.raises(ValueError, match=flag):
            check_generation_arguments(bad)


SYSTEM = "你是一个只用中文回答的助手。"


def training_prompt_ids(tokenizer, system: str, message: str) -> list[int]:
    """The training encoding of ``{system, [user message, assistant ...]}`` up to the assistant role id:
    what the model saw before each answer it learned (the independent oracle of the chat prompt)."""
    from baichuan_finetune.data.encoding import encode_conversations
    from baichuan_finetune.data.records import ASSISTANT, USER, Conversation

    conversation = Conversation(turns=[(USER, message), (ASSISTANT, "好的")], system=system)
    input_ids, _ = encode_conversations(tokenizer, [conversation], 4096).examples()[0]
    return input_ids[: input_ids.index(196) + 1]


def test_system_prompt_ids_equal_the_training_encoding(lora_dir):
    """--system: the chat prompt is the training encoding of the same conversation with that system
    field, and the terminal's reply (also after 'clear') is the one generated from those ids."""
    from baichuan_finetune.tools.chat_cli import new_conversation
    from baichuan_finetune.tools.generation import build_prompt_ids, make_generation_config
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(lora_dir)
    messages = new_conversation(SYSTEM) + [{"role": "user", "content": MESSAGE}]
    prompt = training_prompt_ids(tokenizer, SYSTEM, MESSAGE)
    assert build_prompt_ids(model, tokenizer, messages, 16) == prompt
    assert prompt != training_prompt_ids(tokenizer, "", MESSAGE)  # the system text is really in it
    config = make_generation_config(model, max_new_tokens=16, greedy=True)
    expected = generate_reply(model, tokenizer, messages, config, prompt_ids=prompt).text
    without_system = generate_reply(model, tokenizer, messages[1:], config).text
    assert expected != without_system  # so the terminal's reply shows which prompt it used

    child = spawn_cli(lora_dir, "--max_new_tokens", "16", "--system", SYSTEM)
    assert ask(child, MESSAGE) == expected
    child.sendline("clear")
    child.expect_exact("(history cleared)")
    child.expect_exact("User: ")
    assert ask(child, MESSAGE) == expected  # 'clear' keeps the system prompt
    child.sendline("exit")
    child.expect(__import__("pexpect").EOF)
