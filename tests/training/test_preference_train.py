"""Preference runs of fine-tune.py on CPU with the tiny model: a 2-process ZeRO-3 LoRA DPO run that
learns the shipped pairs (ln 2 at the first step, accuracy, reloading), and short runs of every loss,
full and LoRA, ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import env  # noqa: F401 (the fine-tune.py environment fixture; uses this module's work)
from tools_helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
FINE_TUNE = REPO_ROOT / "fine-tune" / "fine-tune.py"
SHIPPED = REPO_ROOT / "data" / "preference_example.json"
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300
NO_PACKAGE = 'import sys; sys.modules["baichuan_finetune"] = None\n'


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pref")


def run(cmd: list, env: dict) -> str:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"{cmd[:3]}... exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def flags(model_dir: Path, out: Path, *extra) -> list:
    return ["--model_name_or_path", model_dir, "--data_path", SHIPPED, "--output_dir", out, "--report_to", "none",
            "--model_max_length", "128", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "7",
            "--disable_tqdm", "True", "--skip_memory_check", "True", "--stage", "dpo", *extra]


LORA = ["--use_lora", "True", "--lora_r", "8", "--lora_target_modules", "all-linear", "--lora_dropout", "0"]


# ----- 2 processes, ZeRO-3, LoRA DPO: learns the shipped pairs -----


@pytest.fixture(scope="module")
def lora_dpo(tiny_model_dir, env, work) -> Path:
    out = work / "lora-dpo-2proc"
    run([BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), FINE_TUNE,
         *flags(tiny_model_dir, out, *LORA, "--deepspeed", REPO_ROOT / "ds_config.json",
                "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--max_steps", "12",
                "--save_steps", "6", "--eval_data_path", SHIPPED, "--eval_strategy", "steps", "--eval_steps", "12",
                "--per_device_eval_batch_size", "4")], env)
    return out


# Scores every pair with the reloaded adapter and with the same model's adapters disabled (the base),
# without our package: AutoPeftModelForCausalLM and the saved remote code only.
RELOAD = NO_PACKAGE + textwrap.dedent("""
    import json, torch
    from peft import AutoPeftModelForCausalLM
    out, pairs = sys.argv[1], json.load(open(sys.argv[2]))
    model = AutoPeftModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()

    def logp(ids, labels):
        ids, labels = torch.tensor([ids]), torch.tensor([labels])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()
        y = labels[:, 1:]
        token = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        return (token * (y != -100)).sum().item()

    def margins():
        return [logp(p["chosen_input_ids"], p["chosen_labels"]) - logp(p["rejected_input_ids"], p["rejected_labels"])
                for p in pairs]

    trained = margins()
    with model.disable_adapter():
        base = margins()
    print("RESULT " + json.dumps({"module": type(model.get_base_model()).__module__, "trained": trained, "base": base}))
""")


def test_two_process_zero3_lora_dpo_learns_the_pairs(lora_dpo, tiny_model_dir, env, work):
    out = lora_dpo
    logs = history(out)
    steps = {h["step"]: h for h in logs if "loss" in h}
    assert sorted(steps) == list(range(1, 13))
    # Policy == reference at the first step (LoRA B starts at 0): DPO's loss is ln 2.
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[1]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert all(key in h for h in steps.values()), key
    final_eval = [h for h in logs if "eval_loss" in h][-1]
    assert final_eval["eval_rewards/accuracies"] >= 0.9, final_eval  # on every training pair
    assert steps[12]["loss"] < 0.5
    for step in (6, 12):  # checkpoints as in supervised runs
        assert (out / f"checkpoint-{step}" / "checkpoint_complete.json").is_file(), step
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()

    from transformers import AutoTokenizer

    from baichuan_finetune.data.preference_data import prepare_pairs
    from types import SimpleNamespace

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, use_fast=False)
    data = prepare_pairs(SimpleNamespace(data_path=str(SHIPPED), eval_data_path=None, val_size=0,
                                         on_bad_record="error", padding="longest"), tok, 128)
    pairs = work / "pairs.json"
    pairs.write_text(json.dumps([dict(r) for r in data.train_dataset]))
    script = work / "reload.py"
    script.write_text(RELOAD)
    log = run([sys.executable, script, out, pairs], env)
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[7:])
    assert result["module"].startswith("transformers_modules"), result
    better = sum(t > b for t, b in zip(result["trained"], result["base"]))
    assert better >= 0.9 * len(result["base"]), result


# ----- every loss, full and LoRA, ZeRO-2 and ZeRO-3: short runs -----


SMOKE = {
    # full fine-tune, ZeRO-3, DPO with a frozen reference copy under ZeRO-3, cDPO smoothing, eval split.
    "full-zero3-sigmoid": (["--deepspeed", "ds_config.json", "--label_smoothing", "0.1", "--val_size", "4",
                            "--eval_strategy", "steps", "--eval_steps", "2"], math.log(2)),
    # full fine-tune, ZeRO-2, IPO with reference log-probs precomputed: h = 0 at the first step.
    "full-zero2-ipo-precomputed": (["--deepspeed", "ds_config_zero2.json", "--pref_loss", "ipo",
                                    "--precompute_ref_logps", "True"], (1 / (2 * 0.1)) ** 2),
    # LoRA, ZeRO-2, ORPO plus the supervised term; LoRA, ZeRO-3, SimPO (reference-free, no first-step value).
    "lora-zero2-orpo-ftx": (["--deepspeed", "ds_config_zero2.json", *LORA, "--pref_loss", "orpo", "--pref_ftx",
                             "0.5"], None),
    "lora-zero3-simpo": (["--deepspeed", "ds_config.json", *LORA, "--pref_loss", "simpo", "--pref_beta", "2",
                          "--simpo_gamma", "0.5"], None),
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_short_runs(name, tiny_model_dir, env, work):
    extra, first_loss = SMOKE[name]
    out = work / name
    run([sys.executable, FINE_TUNE, *flags(tiny_model_dir, out, "--per_device_train_batch_size", "4",
                                           "--learning_rate", "1e-3", "--max_steps", "2", "--save_strategy", "no",
                                           *extra)], env)
    logs = history(out)
    steps = {h["step"]: h for h in logs if "loss" in h}
    assert sorted(steps) == [1, 2] and all(math.isfinite(h["loss"]) for h in steps.values())
    if first_loss is not None:
        assert steps[1]["loss"] == pytest.approx(first_loss, rel=1e-4)
    assert "rewards/accuracies" in steps[2] and "logps/chosen" in steps[2]
    saved = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
    assert (out / saved).is_file()
    if "precomputed" in name:
        table = json.loads((out / "reference_logps.json").read_text())
        assert len(table["train"]) == 24 and all(c < 0 and r < 0 for c, r in table["train"])
    if "val_size" in extra:
        assert any("eval_rewards/accuracies" in h for h in logs)


# ----- resuming a preference run -----


def test_resumed_dpo_run_with_precomputed_reference_continues_exactly(tiny_model_dir, env, work):
    """Killed after checkpoint-2 (here: a copy holding only it), then resumed: the resumed steps read
    the saved reference log-probs back and equal the uninterrupted run's. A full fine-tune, so that
    reference log-probs recomputed from the moved policy would differ."""
    import shutil

    run_flags = ["--pref_loss", "sigmoid", "--precompute_ref_logps", "True", "--per_device_train_batch_size", "4",
                 "--learning_rate", "5e-3", "--max_steps", "4", "--save_steps", "2"]
    whole = work / "dpo-resume-whole"
    run([sys.executable, FINE_TUNE, *flags(tiny_model_dir, whole, *run_flags)], env)
    resumed = work / "dpo-resume-resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(whole / "reference_logps.json", resumed / "reference_logps.json")
    out = run([sys.executable, FINE_TUNE,
               *flags(tiny_model_dir, resumed, *run_flags, "--resume_from_checkpoint", "True")], env)
    assert "checkpoint-2" in out

    def losses(path: Path) -> dict[int, float]:
        return {h["step"]: h["loss"] for h in history(path) if "loss" in h}

    expected, got = losses(whole), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4] and sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    assert (resumed / "model.safetensors").is_file()
