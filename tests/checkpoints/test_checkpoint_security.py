"""No code runs from a checkpoint on resume, and a resume continues the run that wrote the checkpoint.

A crafted pickle (its payload creates a file when unpickled) is put in every torch file of a real
DeepSpeed ZeRO-2 checkpoint and of a real checkpoint written without DeepSpeed, and the completion marker
is rewritten to match (whoever can write the files can write the marker): ``--resume_from_checkpoint``
refuses in one line and the payload never runs. DeepSpeed's own loads go through
`checkpoint_trust.SafeTorchCheckpointEngine` (seen in the resume log), and a clean checkpoint still
resumes to the same losses. The marker's file list (size and sha256) is checked, and the run record
(`resume_checks`) refuses another data set, sequence length or LoRA shape in one line.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baichuan_finetune.checkpoints import checkpoint_trust, saving
from test_train import FINE_TUNE, REPO_ROOT, env, losses, run, train_data, work  # noqa: F401 (fixtures)

LORA = ["--use_lora", "True", "--lora_r", "4", "--lora_target_modules", "W_pack"]


def flags(model_dir: Path, data: Path, out: Path, *extra) -> list:
    return ["--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out, "--report_to", "none",
            "--model_max_length", "64", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "7", "--disable_tqdm", "True",
            "--save_steps", "2", *extra]


def fine_tune(args: list, env: dict) -> subprocess.CompletedProcess:
    return run([sys.executable, FINE_TUNE, *args], env, check=False)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fine-tune.py: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


class Payload:
    """Unpickled with weights_only=False, this calls ``open(path, "w")``: it creates `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def craft(checkpoint: Path, marker: Path) -> list[str]:
    """Replace every torch file of `checkpoint` by a pickle carrying `Payload`, then rewrite the completion
    marker to match; returns the replaced files."""
    replaced = []
    for f in sorted(checkpoint.rglob("*")):
        if f.is_file() and f.suffix in (".pt", ".pth", ".bin"):
            torch.save({"state": torch.zeros(2), "payload": Payload(marker)}, f)
            replaced.append(f.relative_to(checkpoint).as_posix())
    saving.mark_checkpoint_complete(checkpoint, int(checkpoint.name.split("-")[1]))
    return replaced


@pytest.fixture(scope="module")
def zero_run(tiny_model_dir, train_data, env, work) -> Path:
    """A ZeRO-2 full fine-tune of 4 steps with checkpoints 2 and 4 (ZeRO-2 stores the most types)."""
    out = work / "security-zero2"
    proc = fine_tune(flags(tiny_model_dir, train_data, out, "--max_steps", "4",
                           "--deepspeed", REPO_ROOT / "ds_config_zero2.json"), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, train_data, env, work) -> Path:
    """A LoRA run without DeepSpeed of 2 steps: checkpoint-2 holds optimizer.pt, scheduler.pt, rng_state.pth."""
    out = work / "security-plain"
    proc = fine_tune(flags(tiny_model_dir, train_data, out, "--max_steps", "2", *LORA), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_payload_is_live(tmp_path):
    # The oracle of the tests below: an unsafe load of a crafted file does run its payload.
    marker = tmp_path / "ran"
    torch.save({"payload": Payload(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("which", ["zero2", "plain"])
def test_crafted_pickles_never_run_on_resume(which, zero_run, plain_run, tiny_model_dir, train_data, env, work):
    source, extra = (zero_run, ["--max_steps", "4", "--deepspeed", REPO_ROOT / "ds_config_zero2.json"]) \
        if which == "zero2" else (plain_run, ["--max_steps", "2", *LORA])
    out = work / f"crafted-{which}"
    shutil.copytree(source, out)
    marker = work / f"payload-ran-{which}"
    checkpoints = saving.list_checkpoints(out)
    replaced = [craft(c, marker) for c in checkpoints]
    expected = {"zero2": {"rng_state.pth", "scheduler.pt", "training_args.bin"},
                "plain": {"optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"}}[which]
    assert expected <= set(replaced[-1]), replaced
    if which == "zero2":
        assert sum(r.startswith("global_step") for r in replaced[-1]) == 2  # model and optimizer states
    for resume in (str(checkpoints[-1]), "True"):
        proc = fine_tune(flags(tiny_model_dir, train_data, out, *extra, "--resume_from_checkpoint", resume), env)
        line = error_line(proc)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "holds pickled objects that are not plain tensors or values" in line, line
        assert not marker.exists(), "a crafted pickle ran on resume"


def test_deepspeed_loads_go_through_the_safe_engine(zero_run, tiny_model_dir, train_data, env, work):
    """Resuming a clean ZeRO-2 checkpoint loads DeepSpeed's states with weights_only=True and gives the
    losses of the uninterrupted run."""
    out = work / "clean-resume"
    shutil.copytree(zero_run, out)
    proc = fine_tune(flags(tiny_model_dir, train_data, out, "--max_steps", "4",
                           "--deepspeed", REPO_ROOT / "ds_config_zero2.json",
                           "--resume_from_checkpoint", out / "checkpoint-2"), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    safe = [line for line in proc.stderr.splitlines() if line.endswith("(weights_only=True)")]
    assert any("model_states.pt" in line for line in safe) and any("optim_states.pt" in line for line in safe), \
        proc.stderr[-3000:]
    ref, resumed = losses(zero_run), losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), (ref, resumed)


def test_safe_engine_refuses_a_crafted_file_and_loads_real_states(zero_run, tmp_path):
    engine = checkpoint_trust.safe_checkpoint_engine_class()()
    for f in sorted((zero_run / "checkpoint-4").rglob("global_step*/*.pt")):
        assert isinstance(engine.load(str(f), map_location="cpu"), dict)
    marker = tmp_path / "ran"
    torch.save({"payload": Payload(marker)}, tmp_path / "x_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(tmp_path / "x_optim_states.pt"), map_location="cpu")
    assert not marker.exists()


# ----- the completion marker lists every file with its size and sha256 -----


@pytest.fixture
def checkpoint(plain_run, tmp_path) -> Path:
    path = tmp_path / "checkpoint-2"
    shutil.copytree(plain_run / "checkpoint-2", path)
    assert saving.validate_checkpoint(path) is None
    return path


def test_marker_records_size_and_sha256_of_every_file(checkpoint):
    import hashlib

    files = json.loads((checkpoint / saving.COMPLETE_MARKER).read_text())["files"]
    on_disk = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                     if p.is_file() and p.name != saving.COMPLETE_MARKER)
    assert sorted(files) == on_disk and "run_record.json" in files
    for rel, entry in files.items():
        data = (checkpoint / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda c: _flip_last_byte(c / "trainer_state.json"), "trainer_state.json was changed after"),
    (lambda c: _flip_last_byte(c / "adapter_model.safetensors"), "adapter_model.safetensors was changed after"),
    (lambda c: (c / "evil.pt").write_bytes(b"x"), "evil.pt was added after"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda c: (c / "run_record.json").write_text("{}"), "run_record.json has 2 bytes"),
    (lambda c: (c / saving.COMPLETE_MARKER).write_text('{"global_step": 2}'), "lists no files with their size"),
    (lambda c: (c / saving.COMPLETE_MARKER).write_text(json.dumps({"files": {"scheduler.pt": 10}})),
     "lists no files with their size"),
])
def test_marker_mismatch_is_refused_naming_the_file(checkpoint, damage, expected):
    damage(checkpoint)
    problem = saving.validate_checkpoint(checkpoint)
    assert problem is not None and expected in problem, problem


# ----- the run record: a resume continues the same run -----


@pytest.mark.parametrize("change, expected", [
    (["--model_max_length", "32"], "--model_max_length was 64 when checkpoint-2 was written, now 32; "
                                   "resume with the same setting, or pass --resume_ignore_mismatch model_max_length"),
    (["--per_device_train_batch_size", "1"], "--per_device_train_batch_size was 2 when checkpoint-2 was written, "
                                             "now 1"),
    (["--use_lora", "False"], "--use_lora was True when checkpoint-2 was written, now False; this changes what"),
    (["--lora_r", "8"], "--lora_r was 4 when checkpoint-2 was written, now 8; this changes what"),
    (["--lora_target_modules", "o_proj"], "--lora_target_modules was W_pack when checkpoint-2 was written, "
                                          "now o_proj"),
])
def test_resume_refuses_other_settings(change, expected, plain_run, tiny_model_dir, train_data, env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_run, out)
    proc = fine_tune(flags(tiny_model_dir, train_data, out, "--max_steps", "2", *LORA, *change,
                           "--resume_from_checkpoint", "True"), env)
    assert proc.returncode == 2 and expected in error_line(proc), proc.stderr[-2000:]


def test_resume_refuses_other_data_unless_told(plain_run, tiny_model_dir, train_data, env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_run, out)
    data = tmp_path / "train.json"  # same records, one answer changed: same path length, other content
    data.write_text(train_data.read_text().replace("is red.", "is tan."))
    base = flags(tiny_model_dir, data, out, "--max_steps", "2", *LORA, "--resume_from_checkpoint", "True")
    proc = fine_tune(base, env)
    line = error_line(proc)
    assert proc.returncode == 2 and "--data_path was" in line and str(data) in line, line
    proc = fine_tune([*base, "--resume_ignore_mismatch", "data_path"], env)
    line = error_line(proc)
    assert proc.returncode == 2 and "the content of the data files" in line and "data_content" in line, line
    proc = fine_tune([*base, "--resume_ignore_mismatch", "data_path,data_content"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume_ignore_mismatch: the content of the data files" in proc.stderr


def test_resume_refuses_another_base_model(plain_run, tiny_alibi_model_dir, train_data, env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_run, out)
    proc = fine_tune(flags(tiny_alibi_model_dir, train_data, out, "--max_steps", "2", *LORA,
                           "--resume_from_checkpoint", "True"), env)
    line = error_line(proc)
    assert proc.returncode == 2 and "--model_name_or_path was" in line and "another architecture" in line, line
