"""Merging a LoRA adapter: the merged directory is self-contained and computes the same logits."""

import json
import subprocess
import sys

import pytest
import torch
from tools_helpers import SCRIPTS, generate_reply, make_lora_dir, script_env


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def merged_dir(lora_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "merge_lora.py"), str(lora_dir), str(out), "--max_shard_size", "200KB"],
        env=script_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"into {out}" in result.stdout
    return out


def test_merged_directory_is_self_contained(merged_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
            "configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py"} <= names
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names  # sharded at 200KB
    assert not any(n.startswith("adapter_") for n in names)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("BaichuanForCausalLM")
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    assert generation["user_token_id"] == 195 and generation["assistant_token_id"] == 196
    assert generation["eos_token_id"] == 2


def test_merged_logits_equal_peft_model(tiny_model_dir, lora_dir, merged_dir):
    from baichuan_finetune.loading import load_model

    peft_model, tokenizer = load_model(lora_dir, dtype="float32")
    merged, _ = load_model(merged_dir, dtype="float32")
    base, _ = load_model(tiny_model_dir, dtype="float32")
    ids = torch.tensor([tokenizer.encode("你好，介绍一下你自己。Hello world!")])
    with torch.no_grad():
        lora_logits = peft_model(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-5, rtol=1e-5)
    assert (base_logits - lora_logits).abs().max() > 1e-2  # the adapter changes the model


def test_merged_loads_with_trust_remote_code_only(merged_dir):
    """Without our package imported, the copied code and auto_map load the merged model."""
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged_dir)!r}, trust_remote_code=True);"
        f"t = AutoTokenizer.from_pretrained({str(merged_dir)!r}, trust_remote_code=True);"
        "assert 'baichuan_finetune' not in sys.modules, 'package was imported';"
        "print(type(m).__module__, m(torch.tensor([t.encode('hi')])).logits.shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=script_env(), capture_output=True, text=True,
                            timeout=120, cwd=merged_dir)
    assert result.returncode == 0, result.stderr
    assert "modeling_baichuan" in result.stdout


def test_chat_of_peft_base_model_equals_merged_chat(lora_dir, merged_dir):
    """model.get_base_model().chat() answers with the adapter, in the same format as our generation."""
    from baichuan_finetune.generation import make_generation_config
    from baichuan_finetune.loading import chat_model, load_model

    peft_model, tokenizer = load_model(lora_dir, dtype="float32")
    merged, _ = load_model(merged_dir, dtype="float32")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "北京在哪里？"}]
    config = make_generation_config(peft_model, max_new_tokens=10, greedy=True)
    via_chat = chat_model(peft_model).chat(tokenizer, messages, generation_config=config)
    assert via_chat == merged.chat(tokenizer, messages, generation_config=config)
    assert via_chat == generate_reply(peft_model, tokenizer, messages, config).text


def test_merge_refuses_a_model_directory(tiny_model_dir, tmp_path):
    from baichuan_finetune.merge import merge_lora

    with pytest.raises(ValueError, match="not a LoRA adapter"):
        merge_lora(tiny_model_dir, tmp_path / "out")


def test_fine_tune_lora_output_through_all_tools(tiny_model_dir, shared_dir, tmp_path):
    """A LoRA directory written by fine-tune/fine-tune.py (2 steps) -> merge, cli, server, evaluation."""
    from tools_helpers import REPO_ROOT, require, start_server, stop_server

    fine_tune = REPO_ROOT / "fine-tune" / "fine-tune.py"
    if not fine_tune.is_file():
        pytest.skip(f"{fine_tune} is absent")
    data = REPO_ROOT / "data" / "examples" / "sharegpt.jsonl"
    adapter = tmp_path / "lora"
    env = {**script_env(), "DS_ACCELERATOR": "cpu", "BAICHUAN_FINETUNE_CACHE": str(tmp_path / "cache")}
    train = subprocess.run(
        [sys.executable, str(fine_tune), "--model_name_or_path", str(tiny_model_dir), "--data_path", str(data),
         "--output_dir", str(adapter), "--report_to", "none", "--model_max_length", "128",
         "--per_device_train_batch_size", "2", "--max_steps", "2", "--use_lora", "True", "--lora_r", "4",
         "--learning_rate", "1e-2", "--save_strategy", "no", "--disable_tqdm", "True",
         "--preprocessing_num_workers", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert (adapter / "adapter_config.json").is_file()

    # merge: same logits as the PeftModel
    # (merge and evaluation in-process: their scripts are tested as subprocesses elsewhere)
    from baichuan_finetune.generation import make_generation_config
    from baichuan_finetune.loading import load_model
    from baichuan_finetune.merge import merge_lora

    merged = merge_lora(adapter, tmp_path / "merged")

    peft_model, tokenizer = load_model(adapter, dtype="float32")
    merged_model, _ = load_model(merged, dtype="float32")
    ids = torch.tensor([tokenizer.encode("What color is Aram number 0?")])
    with torch.no_grad():
        torch.testing.assert_close(merged_model(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)

    # The greedy replies the library gives in-process: the cli and the server must give the same.
    def expected(question: str):
        messages = [{"role": "user", "content": question}]
        return generate_reply(peft_model, tokenizer, messages,
                              make_generation_config(peft_model, max_new_tokens=8, greedy=True))

    # cli
    pexpect = require("pexpect", "the terminal demo is driven through a pty (requirements-tools.txt)")
    child = pexpect.spawn(sys.executable, [str(SCRIPTS / "cli_demo.py"), "--model", str(adapter), "--greedy",
                                           "--max_new_tokens", "8"], env=env, encoding="utf-8", timeout=90,
                          dimensions=(50, 400))
    child.expect_exact("User: ")
    child.sendline("What color is Aram number 0?")
    child.expect_exact("Baichuan 2: ")
    child.expect_exact("\r\n\r\nUser: ")
    assert child.before.replace("\r\n", "\n") == expected("What color is Aram number 0?").text
    child.sendline("exit")
    child.expect(pexpect.EOF)

    # server
    require("fastapi", "the API server needs fastapi and uvicorn (requirements-tools.txt)")
    openai = require("openai", "the API test uses the official openai client (requirements-tools.txt)")
    proc, base_url = start_server("openai_api.py", adapter)
    try:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        response = client.chat.completions.create(model=adapter.name, max_tokens=8, temperature=0,
                                                  messages=[{"role": "user", "content": "What color is Aram?"}])
        reference = expected("What color is Aram?")
        assert response.choices[0].message.content == reference.text
        assert response.usage.completion_tokens == reference.completion_tokens
    finally:
        stop_server(proc)

    # evaluation
    from baichuan_finetune.evaluate import evaluate_task

    report = evaluate_task(peft_model, tokenizer, shared_dir / "data" / "cmmlu_subset", shots=2, limit=2,
                           subjects=["marketing"])
    assert report["subjects"]["marketing"]["total"] == 2
