"""End-to-end training on CPU: DeepSpeed ZeRO-3 (1 and 2 processes), LoRA, saving, reloading, resuming.

Every run uses the tiny model, a few steps and one thread per process; runs are module-scoped fixtures
so that several tests check one run. The official command line is run as published, with CPU flags
instead of ``--bf16 True --tf32 True``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tools_helpers import free_port  # one port allocator for every test (no races)

REPO_ROOT = Path(__file__).resolve().parents[2]
FINE_TUNE = REPO_ROOT / "fine-tune" / "fine-tune.py"
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300

# A process that must not be able to import our package (it loads saved directories with remote code).
NO_PACKAGE = 'import sys; sys.modules["baichuan_finetune"] = None\n'


def _conversations(n: int) -> list[dict]:
    colors = ["red", "green", "blue", "black", "white", "yellow", "purple", "orange"]
    names = ["Aram", "Bex", "Cato", "Dovi", "Elin", "Faro", "Gida", "Hux"]
    out = []
    for i in range(n):
        name, color = names[i % len(names)], colors[(i * 3) % len(colors)]
        out.append({"id": f"t{i}", "conversations": [
            {"from": "human", "value": f"What color is {name} number {i}?"},
            {"from": "gpt", "value": f"{name} number {i} is {color}."},
            {"from": "human", "value": "And in Chinese?"},
            {"from": "gpt", "value": f"{name} {i} 是{color}色。"},
        ]})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def train_data(work: Path) -> Path:
    path = work / "train.json"
    path.write_text(json.dumps(_conversations(16), ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def env(work: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
             TOKENIZERS_PARALLELISM="false", BAICHUAN_FINETUNE_CACHE=str(work / "data-cache"),
             PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run(cmd: list[str], env: dict, timeout: int = RUN_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd[:3]}... exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def common_flags(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out, "--report_to", "none",
            "--model_max_length", "128", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "7", "--disable_tqdm", "True",
            "--deepspeed", REPO_ROOT / "ds_config.json"]


RESUME_FLAGS = ["--max_steps", "8", "--save_steps", "4"]
LORA_FLAGS = ["--use_lora", "True", "--lora_r", "4", "--lora_target_modules", "all-linear"]

# Runs fine-tune's main() with a callback that hangs right after checkpoint-<HANG_AT_STEP> is complete,
# so that the test can SIGKILL a run that is certainly mid-training.
HANGING_MAIN = textwrap.dedent(f"""
    import os, sys, time
    sys.path.insert(0, {str(FINE_TUNE.parent)!r})
    from transformers import TrainerCallback
    from baichuan_finetune.training.train import main

    class Hang(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["HANG_AT_STEP"]):
                time.sleep(3600)

    sys.exit(main(sys.argv[1:], callbacks=[Hang()]))
""")


def run_killed(cmd_args: list, env: dict, work: Path, out: Path, step: int) -> None:
    """Start a run, SIGKILL its process group once checkpoint-<step> is complete."""
    script = work / "hanging_main.py"
    script.write_text(HANGING_MAIN)
    log = open(work / f"{out.name}.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), *map(str, cmd_args)], env={**env, "HANG_AT_STEP": str(step)},
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    marker = out / f"checkpoint-{step}" / "checkpoint_complete.json"
    deadline = time.time() + RUN_TIMEOUT
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"run exited {proc.returncode} before checkpoint-{step}:\n"
                            + (work / f"{out.name}.log").read_text()[-4000:])
            if time.time() > deadline:
                pytest.fail(f"no checkpoint-{step} after {RUN_TIMEOUT}s")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (out / "trainer_state.json").exists(), "the killed run finished; it was meant to be killed mid-way"


def resumed(model_dir, train_data, env, work: Path, name: str, extra: list[str]) -> tuple[Path, Path, str]:
    """An uninterrupted run, and a run killed after checkpoint-4 then resumed; returns both dirs and the log."""
    ref = work / f"{name}-ref"
    run([sys.executable, FINE_TUNE, *common_flags(model_dir, train_data, ref), *RESUME_FLAGS, *extra], env)
    out = work / f"{name}-resumed"
    args = [*common_flags(model_dir, train_data, out), *RESUME_FLAGS, *extra]
    run_killed(args, env, work, out, step=4)
    # A checkpoint whose writing was interrupted (no completion marker) must not be taken as the latest.
    partial = out / "checkpoint-6"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")
    proc = run([sys.executable, FINE_TUNE, *args, "--resume_from_checkpoint", "True"], env)
    return ref, out, proc.stdout + proc.stderr


# ----- the Trainer in this process: the objective reaches the model through peft -----


def test_trainer_passes_its_objective_and_counts_tokens(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from baichuan_finetune.options.arguments import TrainingArguments
    from baichuan_finetune.objectives.losses import CausalLMLoss, training_objective
    from baichuan_finetune.training.trainer import BaichuanTrainer

    assert training_objective(None, SimpleNamespace(z_loss_weight=0.25)) == CausalLMLoss(z_loss_weight=0.25)
    assert training_objective(0.0, SimpleNamespace(z_loss_weight=0.25)) == CausalLMLoss(z_loss_weight=0.0)

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["W_pack"]))
    objective, seen = CausalLMLoss(z_loss_weight=0.5), []

    def head_loss(hidden, weight, labels):
        seen.append(labels)
        return objective(hidden, weight, labels)

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = BaichuanTrainer(model=model, args=args, head_loss=head_loss)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 0, 0]])
    labels = torch.tensor([[-100, -100, 41, 42, 43, 2, -100, -100]])
    inputs = {"input_ids": ids, "attention_mask": (torch.arange(8) < 6).long()[None], "labels": labels}
    model.train()
    loss = trainer.compute_loss(model, inputs)
    assert len(seen) == 1 and torch.equal(seen[0], labels[0, 1:])  # the model's shifted labels
    assert torch.allclose(loss, model(**inputs, head_loss=objective).loss)
    assert not torch.allclose(loss, model(**inputs, head_loss=CausalLMLoss(z_loss_weight=0.0)).loss)
    assert "head_loss" not in inputs  # the batch itself is left as it was
    # 6 real tokens, 4 predicted labels (41, 42, 43, 2), 8 batch slots.
    assert trainer._total.tolist() == [6, 4, 8]


# ----- single process, ZeRO-3, full fine-tune (config file as the only argument) -----


@pytest.fixture(scope="module")
def full_resume(tiny_model_dir, train_data, env, work):
    return resumed(tiny_model_dir, train_data, env, work, "full", [])


def test_single_process_zero3_full_from_yaml(tiny_model_dir, train_data, env, work):
    out = work / "yaml-run"
    config = work / "run.yaml"
    config.write_text(textwrap.dedent(f"""\
        model_name_or_path: {tiny_model_dir}
        data_path: {train_data}
        output_dir: {out}
        deepspeed: {REPO_ROOT / 'ds_config.json'}
        report_to: none
        model_max_length: 128
        per_device_train_batch_size: 8
        max_steps: 2
        logging_steps: 1
        save_strategy: "no"
    """))
    proc = run([sys.executable, FINE_TUNE, config], env)
    assert "Data:" in proc.stdout and "records read: 16" in proc.stdout  # the data report, printed once
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "supervised_tokens_per_second"):
            assert key in h, key
        assert h["tokens_per_second"] > h["supervised_tokens_per_second"] > 0
    # 2 steps of 8 are exactly one epoch of the 16 conversations: every token counted once.
    tokens, supervised = token_counts(tiny_model_dir, train_data, work / "count-cache")
    throughput = json.loads((out / "throughput.json").read_text())
    assert (throughput["tokens"], throughput["supervised_tokens"]) == (tokens, supervised)
    assert throughput["token_slots"] >= tokens and throughput["world_size"] == 1
    assert (out / "model.safetensors").is_file() and not (out / "zero_to_fp32.py").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py"):
        assert (out / name).is_file(), name
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["auto_map"]["AutoModelForCausalLM"] == "modeling_baichuan.BaichuanForCausalLM"
    assert config_json["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text())["user_token_id"] == 195
    # One model_max_length: the base's 512 (longer than the training length 128), in both files.
    assert config_json["model_max_length"] == 512
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512


def token_counts(model_dir: Path, data: Path, cache: Path) -> tuple[int, int]:
    """Real and supervised tokens of every training example, as fine-tune.py prepares and batches them."""
    from transformers import AutoTokenizer

    from baichuan_finetune.options.arguments import DataArguments
    from baichuan_finetune.model.modeling_baichuan import IGNORE_INDEX
    from baichuan_finetune.data.preprocess import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    prepared = prepare_data(DataArguments(data_path=str(data), data_cache_dir=str(cache)), tokenizer, 128)
    tokens = supervised = 0
    for example in prepared.train_dataset:
        batch = prepared.data_collator([example])
        tokens += int(batch["attention_mask"].sum())
        # The first label of a row is never predicted (labels shift by one inside the model).
        supervised += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return tokens, supervised


def assert_same_losses(ref: Path, out: Path, first_step: int, last_step: int) -> None:
    a, b = losses(ref), losses(out)
    assert sorted(a) == list(range(1, last_step + 1))
    assert sorted(b) == list(range(1, last_step + 1))
    for step in range(first_step, last_step + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a, b)


def test_kill_and_resume_full_zero3(full_resume):
    ref, out, log = full_resume
    assert "Resuming from" in log and "checkpoint-4" in log and "checkpoint-6" not in log.split("Resuming from")[1][:200]
    assert_same_losses(ref, out, 5, 8)
    assert (out / "checkpoint-8" / "checkpoint_complete.json").is_file()
    assert (out / "model.safetensors").is_file()


# ----- single process, ZeRO-3, LoRA: kill and resume (dropout makes the RNG state matter) -----


@pytest.fixture(scope="module")
def lora_resume(tiny_model_dir, train_data, env, work):
    return resumed(tiny_model_dir, train_data, env, work, "lora", [*LORA_FLAGS, "--lora_dropout", "0.1"])


def test_kill_and_resume_lora_zero3(lora_resume):
    ref, out, log = lora_resume
    assert "Resuming from" in log and "checkpoint-4" in log
    assert_same_losses(ref, out, 5, 8)
    from safetensors.torch import load_file

    a = load_file(ref / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    # lora_A and lora_B of all 5 linear layers (all-linear) in 2 layers.
    assert a.keys() == b.keys() and len(a) == 20
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key


# ----- the official command line, 2 processes, ZeRO-3, full fine-tune -----


def official_flags(model_dir: Path, data: Path, out: Path) -> list[str]:
    """The published command, on the tiny model, with CPU flags instead of --bf16 True --tf32 True."""
    return ["--report_to", "none", "--data_path", data, "--model_name_or_path", model_dir, "--output_dir", out,
            "--model_max_length", "128", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--save_strategy", "epoch", "--learning_rate", "2e-5",
            "--lr_scheduler_type", "constant", "--adam_beta1", "0.9", "--adam_beta2", "0.98", "--adam_epsilon",
            "1e-8", "--max_grad_norm", "1.0", "--weight_decay", "1e-4", "--warmup_ratio", "0.0",
            "--logging_steps", "1", "--gradient_checkpointing", "True", "--deepspeed", "ds_config.json",
            "--bf16", "False"]


@pytest.fixture(scope="module")
def official_full(tiny_model_dir, train_data, env, work) -> tuple[Path, str]:
    hostfile = work / "hostfile-local"
    hostfile.write_text("localhost slots=2\n")
    out = work / "official-full"
    # localhost needs no ssh: --no_ssh_check, and --master_addr (else DeepSpeed asks `ssh localhost hostname -I`).
    proc = run([BIN / "deepspeed", f"--hostfile={hostfile}", "--no_ssh_check", "--master_addr", "127.0.0.1",
                "--master_port", free_port(),
                FINE_TUNE, *official_flags(tiny_model_dir, train_data, out)], env)
    return out, proc.stdout + proc.stderr


RELOAD_FULL = NO_PACKAGE + textwrap.dedent("""
    import json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    out, ckpt = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    # The trained weights as DeepSpeed holds them: the fp32 master copy in the ZeRO-3 shards.
    trained = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    result = trained.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(ckpt), strict=False)
    ids = torch.tensor([[1] + tok.encode("What color is Bex number 9?", add_special_tokens=False)])
    with torch.no_grad():
        a, b = model(ids).logits, trained(ids).logits
    reply = model.chat(tok, [{"role": "user", "content": "What color is Bex?"}],
                       generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, user_token_id=195,
                                                          assistant_token_id=196, eos_token_id=2, pad_token_id=0))
    print(json.dumps({"module": type(model).__module__, "missing": result.missing_keys,
                      "max_diff": (a - b).abs().max().item(), "equal": torch.equal(a, b), "reply": reply}))
""")


def test_official_command_two_process_zero3_full(official_full, env, work):
    out, log = official_full
    assert "dist_world_size=2" in log
    steps = losses(out)
    # 16 examples, 2 processes x 4 per device: 2 steps per epoch, 2 epochs, a checkpoint per epoch.
    assert sorted(steps) == [1, 2, 3, 4]
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "model.safetensors").is_file() and not (out / "zero_to_fp32.py").exists()
    script = work / "reload_full.py"
    script.write_text(RELOAD_FULL)
    proc = run([sys.executable, script, out, out / "checkpoint-4"], env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules"), result  # remote code, not our package
    assert result["missing"] == []
    assert result["equal"], result  # the consolidated model is exactly the trained one


# ----- 2 processes, ZeRO-3, LoRA through scripts/train_lora.sh with a hostfile -----


@pytest.fixture(scope="module")
def lora_hostfile_run(tiny_model_dir, train_data, env, work) -> tuple[Path, str]:
    hostfile = work / "hostfile-lora"
    hostfile.write_text("# one node, two processes\n\nlocalhost slots=2  # this machine\n")
    out = work / "lora-2proc"
    flags = official_flags(tiny_model_dir, train_data, out)
    flags[flags.index("--learning_rate") + 1] = "1e-3"
    proc = run(["bash", REPO_ROOT / "scripts" / "train_lora.sh", "--hostfile", hostfile, "--master_port",
                free_port(), *flags, "--lora_r", "4"], env)
    return out, proc.stdout + proc.stderr


RELOAD_LORA = NO_PACKAGE + textwrap.dedent("""
    import json, torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    out, ckpt = sys.argv[1], sys.argv[2]
    model = AutoPeftModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    saved = load_file(out + "/adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    trained = {k.replace(".default", ""): v for k, v in get_fp32_state_dict_from_zero_checkpoint(ckpt).items()
               if "lora_" in k}
    ids = torch.tensor([[1] + tok.encode("What color is Bex?", add_special_tokens=False) + [196]])
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    print(json.dumps({
        "base_module": type(model.get_base_model()).__module__,
        "keys": sorted(saved), "loaded_keys": sorted(loaded), "trained_keys": sorted(trained),
        "numel": {k: v.numel() for k, v in saved.items()},
        "equal_loaded": all(torch.equal(saved[k], loaded[k]) for k in saved),
        "equal_trained": all(torch.equal(saved[k], trained[k].to(saved[k].dtype)) for k in saved if k in trained),
        "lora_B_nonzero": all(v.abs().sum().item() > 0 for k, v in saved.items() if "lora_B" in k),
        "generated": gen.shape[1] - ids.shape[1],
    }))
""")


def test_lora_two_process_zero3_hostfile_launch_and_reload(lora_hostfile_run, tiny_model_dir, env, work):
    out, log = lora_hostfile_run
    assert "+ deepspeed --hostfile" in log  # train.sh prints the exact command
    assert "dist_world_size=2" in log
    assert sorted(losses(out)) == [1, 2, 3, 4]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert config["r"] == 4 and config["target_modules"] == ["W_pack"] and config["lora_alpha"] == 32
    assert not (out / "model.safetensors").exists()  # an adapter, never a full model
    for name in ("tokenizer.model", "generation_config.json", "modeling_baichuan.py"):
        assert (out / name).is_file(), name
    script = work / "reload_lora.py"
    script.write_text(RELOAD_LORA)
    proc = run([sys.executable, script, out, out / "checkpoint-4"], env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["base_module"].startswith("transformers_modules"), result
    assert len(result["keys"]) == 4  # lora_A and lora_B of W_pack in 2 layers
    # r 4 on W_pack (128 -> 3 x 128): A is 4 x 128, B is 384 x 4.
    assert result["numel"] == {k: 4 * 128 if "lora_A" in k else 3 * 128 * 4 for k in result["keys"]}, result
    assert result["keys"] == result["loaded_keys"] == result["trained_keys"]
    assert result["equal_loaded"] and result["equal_trained"] and result["lora_B_nonzero"], result
    assert result["generated"] == 3


# ----- two "nodes" on this machine, one scripts/train.sh per node (no ssh), ZeRO-2, LoRA -----


def test_two_node_launch_without_ssh(tiny_model_dir, train_data, env, work):
    hostfile = work / "hostfile-2nodes"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = work / "two-nodes"
    port = str(free_port())
    flags = [*common_flags(tiny_model_dir, train_data, out), "--max_steps", "2", "--save_strategy", "no",
             *LORA_FLAGS]
    flags[flags.index("--deepspeed") + 1] = REPO_ROOT / "ds_config_zero2.json"  # the ZeRO-2 variant, too
    procs = [subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "train.sh"), "--hostfile", str(hostfile), "--no_ssh",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                               *map(str, flags)], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=RUN_TIMEOUT)[0])
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "--no_ssh --node_rank 1" in logs[1]
    assert all("dist_world_size=2" in log for log in logs)  # one process per node, one world
    assert sorted(losses(out)) == [1, 2]
    assert (out / "adapter_model.safetensors").is_file()


# ----- 2 processes, ZeRO-3: a kill just before a checkpoint's marker, then resume (saving.py's fault hook) -----


def test_two_process_zero3_kill_before_marker_then_resume(official_full, tiny_model_dir, train_data, env, work):
    ref, _ = official_full
    hostfile = work / "hostfile-local"  # written by official_full
    out = work / "official-killed"
    launch = [BIN / "deepspeed", f"--hostfile={hostfile}", "--no_ssh_check", "--master_addr", "127.0.0.1"]
    flags = official_flags(tiny_model_dir, train_data, out)
    # Both ranks have written every shard of checkpoint-4; the marker is not written yet.
    proc = run([*launch, "--master_port", free_port(), FINE_TUNE, *flags],
               {**env, "BAICHUAN_FINETUNE_FAULT": "before_marker:kill:4"}, check=False)
    assert proc.returncode != 0
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "checkpoint_complete.json").exists()
    proc = run([*launch, "--master_port", free_port(), FINE_TUNE, *flags, "--resume_from_checkpoint", "True"], env)
    assert f"Resuming from {out / 'checkpoint-2'}" in proc.stdout + proc.stderr
    assert_same_losses(ref, out, 3, 4)
    assert (out / "checkpoint-4" / "checkpoint_complete.json").is_file() and (out / "model.safetensors").is_file()
