"""Merging a LoRA adapter: the merged directory is self-contained and computes the same logits."""

import json
import subprocess
import sys
from pathlib import Path

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
    # make_lora_dir records no base fingerprint (as older adapters): merged, with one warning line.
    assert "warning:" in result.stderr and "records no base_model_fingerprint.json" in result.stderr
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
    from baichuan_finetune.tools.loading import load_model

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
    from baichuan_finetune.tools.generation import make_generation_config
    from baichuan_finetune.tools.loading import chat_model, load_model

    peft_model, tokenizer = load_model(lora_dir, dtype="float32")
    merged, _ = load_model(merged_dir, dtype="float32")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "北京在哪里？"}]
    config = make_generation_config(peft_model, max_new_tokens=10, greedy=True)
    via_chat = chat_model(peft_model).chat(tokenizer, messages, generation_config=config)
    assert via_chat == merged.chat(tokenizer, messages, generation_config=config)
    assert via_chat == generate_reply(peft_model, tokenizer, messages, config).text


def test_merge_refuses_a_model_directory(tiny_model_dir, tmp_path):
    from baichuan_finetune.tools.merge import merge_lora

    with pytest.raises(ValueError, match="not a LoRA adapter"):
        merge_lora(tiny_model_dir, tmp_path / "out")


def test_fine_tune_lora_output_through_all_tools(tiny_model_dir, fixtures_dir, tmp_path):
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
    # Training recorded its base; the merge below checks it (no warning, no refusal).
    from baichuan_finetune.checkpoints import fingerprint

    recorded = fingerprint.read_fingerprint(adapter)
    assert recorded is not None and recorded["architecture"]["position_embedding"] == "rope"
    assert fingerprint.differences(recorded, fingerprint.compute_fingerprint(tiny_model_dir)) == []

    # merge: same logits as the PeftModel
    # (merge and evaluation in-process: their scripts are tested as subprocesses elsewhere)
    from baichuan_finetune.tools.generation import make_generation_config
    from baichuan_finetune.tools.loading import load_model
    from baichuan_finetune.tools.merge import merge_lora

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
    from baichuan_finetune.evaluation.multiple_choice import evaluate_task

    report = evaluate_task(peft_model, tokenizer, fixtures_dir / "multiple_choice" / "cmmlu_layout", shots=2, limit=2,
                           subjects=["marketing"])
    assert report["subjects"]["marketing"]["total"] == 2


# ----- the base recorded in the adapter (base_model_fingerprint.json) -----


def _point_adapter_at(lora: Path, base: Path, dest: Path) -> Path:
    """A copy of `lora` whose adapter_config.json names `base` (a moved or replaced base directory)."""
    import shutil

    shutil.copytree(lora, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def fingerprinted_lora(tiny_model_dir, tmp_path_factory):
    from baichuan_finetune.checkpoints.fingerprint import FINGERPRINT_FILE, write_fingerprint

    lora = make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("fp") / "adapter")
    assert write_fingerprint(tiny_model_dir, lora) == lora / FINGERPRINT_FILE  # as training does
    return lora


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Same shapes and tokenizer as the tiny base, other weights (another seed)."""
    from baichuan_finetune.builder.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("other") / "rope-seed1", position_embedding="rope", seed=1)


@pytest.fixture(scope="module")
def alibi_base(tiny_model_dir, tmp_path_factory):
    """The tiny base's very weights under an ALiBi config (the 13B layout): only the position scheme differs."""
    import shutil

    path = tmp_path_factory.mktemp("alibi") / "alibi-same-weights"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["position_embedding"] = "alibi"
    config.pop("max_position_embeddings")
    (path / "config.json").write_text(json.dumps(config))
    return path


def _merge_main(argv, capsys, monkeypatch):
    """scripts/merge_lora.py's main in this process: (exit code, stderr lines)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_lora_script", SCRIPTS / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["merge_lora.py"])
    code = 0
    try:
        module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("which, expected", [
    ("other", "model.embed_tokens.weight holds other values"),
    ("alibi", "position_embedding rope (adapter's base) vs alibi (this base)"),
])
def test_merge_refuses_another_base_unless_forced(which, expected, fingerprinted_lora, other_base, alibi_base,
                                                  tmp_path, capsys, monkeypatch):
    base = other_base if which == "other" else alibi_base
    lora = _point_adapter_at(fingerprinted_lora, base, tmp_path / "adapter")
    out = tmp_path / "merged"
    code, lines = _merge_main([lora, out], capsys, monkeypatch)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("merge_lora.py: error: ") and expected in lines[0] and "--force" in lines[0]
    assert not out.exists()

    code, lines = _merge_main([lora, out, "--force"], capsys, monkeypatch)
    assert code == 0, lines
    assert any("warning: --force" in line and expected in line for line in lines), lines
    assert (out / "config.json").is_file()
    merged_config = json.loads((out / "config.json").read_text())
    assert merged_config["position_embedding"] == ("alibi" if which == "alibi" else "rope")


def test_fingerprint_matches_its_base_and_the_same_base_in_another_dtype(tiny_model_dir, tmp_path):
    """bf16 copy of the same base: same fingerprint (statistics, not a byte hash); other tensors: not."""
    from safetensors.torch import load_file, save_file

    from baichuan_finetune.checkpoints import fingerprint

    bf16 = tmp_path / "bf16"
    import shutil

    shutil.copytree(tiny_model_dir, bf16)
    tensors = load_file(bf16 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, bf16 / "model.safetensors",
              metadata={"format": "pt"})
    original = fingerprint.compute_fingerprint(tiny_model_dir)
    assert fingerprint.differences(original, original) == []
    assert fingerprint.differences(original, fingerprint.compute_fingerprint(bf16)) == []
    # One row of lm_head changed by a little (a light fine-tune of the head) is seen.
    tensors["lm_head.weight"][3] += 0.05
    save_file(tensors, bf16 / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint.differences(original, fingerprint.compute_fingerprint(bf16)) == [
        "lm_head.weight holds other values (first 16 rows differ)"]
    # A .bin base is read too (torch.load mmap, weights_only).
    bin_dir = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, bin_dir)
    (bin_dir / "model.safetensors").unlink()
    torch.save(load_file(tiny_model_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    assert fingerprint.differences(original, fingerprint.compute_fingerprint(bin_dir)) == []


def test_adapter_without_fingerprint_merges_with_a_warning(lora_dir, tmp_path, capsys, monkeypatch):
    """make_lora_dir writes no fingerprint (as adapters of older versions): checked as far as possible."""
    from baichuan_finetune.tools.merge import check_merge

    plan = check_merge(lora_dir, tmp_path / "out")
    assert len(plan.warnings) == 1 and "records no base_model_fingerprint.json" in plan.warnings[0]


def test_overwrite_replaces_a_non_empty_output_dir_whole(lora_dir, merged_dir, tmp_path):
    from baichuan_finetune.tools.merge import MergeError, merge_lora

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale-shard.safetensors").write_text("old")
    with pytest.raises(MergeError, match="is not empty.*--overwrite"):
        merge_lora(lora_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["stale-shard.safetensors"]  # refused: untouched
    merge_lora(lora_dir, out, max_shard_size="200KB", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in merged_dir.iterdir())
    assert not list(tmp_path.glob(".out.*"))  # nothing set aside is left behind


def test_the_next_merge_cleans_up_after_a_killed_one(lora_dir, tmp_path):
    """A SIGKILL mid-merge leaves .out.merging-PID (and maybe .out.replaced-PID) behind: the next merge
    removes what belongs to a dead PID, keeps what a running one owns, and never the only old output."""
    import os

    from baichuan_finetune.tools.merge import merge_lora, remove_stale_merges

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "out"
        stale = tmp_path / f".out.merging-{dead.pid}"
        stale.mkdir()
        (stale / "model-00001-of-00002.safetensors").write_text("half written")
        busy = tmp_path / f".out.merging-{running.pid}"
        busy.mkdir()
        old = tmp_path / f".out.replaced-{dead.pid}"  # killed between the two renames: out is missing
        old.mkdir()
        (old / "config.json").write_text("{}")
        other = tmp_path / f".outer.merging-{dead.pid}"  # another output directory's
        other.mkdir()
        warnings = []
        merge_lora(lora_dir, out, max_shard_size="200KB", warn=warnings.append)
        assert not stale.exists() and busy.is_dir() and old.is_dir() and other.is_dir()
        assert f"removed {stale}, left by a merge that was killed (PID {dead.pid})" in warnings
        assert any(w.startswith(f"{old} is the previous {out}") and "kept" in w for w in warnings), warnings
        assert (out / "config.json").is_file()
        # Now that out exists, the set-aside old output is what the finished swap would have removed.
        assert remove_stale_merges(out) == [f"removed {old}, left by a merge that was killed (PID {dead.pid})"]
        assert not old.exists() and busy.is_dir()
        assert os.getpid() != dead.pid
    finally:
        running.kill()
        running.wait()
