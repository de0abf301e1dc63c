"""Faults during training and saving, injected through ``$BAICHUAN_FINETUNE_FAULT`` (see saving.py):
a kill at every step of a checkpoint save, of rotation and of the final save, then
``--resume_from_checkpoint True``; a full disk at each write; damaged checkpoints on resume; non-finite
losses; two runs into one output directory.

Single-process runs without DeepSpeed on the tiny model (a few seconds each); the ZeRO-3 kill and
resume paths are in test_train.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from baichuan_finetune.checkpoints import saving
from test_train import FINE_TUNE, REPO_ROOT, env, losses, run, train_data, work  # noqa: F401 (fixtures)

# Checkpoints at steps 2, 4, 6 with --save_total_limit 1: the save of checkpoint-4 rotates checkpoint-2 away.
STEPS, SAVE_STEPS, FAULT_STEP = 6, 2, 4


def flags(model_dir: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["--model_name_or_path", model_dir, "--data_path", data, "--output_dir", out, "--report_to", "none",
            "--model_max_length", "64", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "7", "--disable_tqdm", "True",
            "--max_steps", str(STEPS), "--save_steps", str(SAVE_STEPS), "--save_total_limit", "1", *extra]


def fine_tune(args: list, env: dict, fault: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
    e = {**env}
    if fault:
        e[saving.FAULT_ENV] = fault
    return run([sys.executable, FINE_TUNE, *args], e, check=check)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one error line (library log lines start with a date or a progress bar); no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fine-tune.py: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def assert_all_finite(root: Path) -> int:
    """Every tensor in every weight/optimizer file under `root` is finite; returns how many files."""
    count = 0
    for f in sorted(root.rglob("*")):
        if f.suffix == ".safetensors":
            tensors = load_file(f)
        elif f.suffix in (".pt", ".bin") and f.name != "training_args.bin":
            loaded = torch.load(f, weights_only=True, map_location="cpu")
            tensors = {}

            def walk(x, name=""):
                if isinstance(x, torch.Tensor):
                    tensors[name] = x
                elif isinstance(x, dict):
                    for k, v in x.items():
                        walk(v, f"{name}.{k}")
                elif isinstance(x, (list, tuple)):
                    for i, v in enumerate(x):
                        walk(v, f"{name}.{i}")

            walk(loaded)
        else:
            continue
        count += 1
        for name, t in tensors.items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"{f}: {name} is not finite"
    return count


@pytest.fixture(scope="module")
def reference(tiny_model_dir, train_data, env, work) -> Path:
    out = work / "reference"
    fine_tune(flags(tiny_model_dir, train_data, out), env, check=True)
    return out


def assert_losses_equal(ref: Path, out: Path) -> None:
    a, b = losses(ref), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (a, b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a, b)


def assert_finished(out: Path) -> None:
    """A complete final directory, one complete checkpoint (--save_total_limit 1), nothing left over."""
    for name in ("config.json", "model.safetensors", "tokenizer.model", "modeling_baichuan.py"):
        assert (out / name).is_file(), name
    assert [p.name for p in saving.list_checkpoints(out)] == [f"checkpoint-{STEPS}"]
    assert saving.validate_checkpoint(out / f"checkpoint-{STEPS}") is None
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no lock file, set-aside checkpoint or temporary final directory


_killed: dict[str, Path] = {}


def killed_run(point: str, tiny_model_dir, train_data, env, work) -> Path:
    """An output directory whose run was SIGKILLed at `point` of the save of step FAULT_STEP (cached)."""
    if point not in _killed:
        out = work / f"killed-{point}"
        step = STEPS if point.startswith("final_") else FAULT_STEP
        proc = fine_tune(flags(tiny_model_dir, train_data, out), env, fault=f"{point}:kill:{step}")
        assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
        _killed[point] = out
    return _killed[point]


# ----- a kill at every step of a checkpoint save and of rotation, then resume -----


# Where each kill leaves the newest complete checkpoint: the previous one until the new one's marker exists.
KILL_POINTS = {"before_save": 2, "after_weights": 2, "after_optimizer": 2, "before_marker": 2,
               "after_marker": 4, "mid_rotate": 4}


def test_every_checkpoint_fault_point_is_tested():
    assert tuple(KILL_POINTS) == saving.CHECKPOINT_FAULT_POINTS


@pytest.mark.parametrize("point, resumes_from", KILL_POINTS.items())
def test_kill_during_checkpoint_save_then_resume(point, resumes_from, reference, tiny_model_dir, train_data, env,
                                                 work):
    out = killed_run(point, tiny_model_dir, train_data, env, work)
    # Always a complete, valid checkpoint to resume from: the previous one, or the new one once marked.
    last = saving.last_complete_checkpoint(out)
    assert last is not None and last.name == f"checkpoint-{resumes_from}"
    assert saving.validate_checkpoint(last) is None
    resumed = work / f"resumed-{point}"
    shutil.copytree(out, resumed)
    proc = fine_tune(flags(tiny_model_dir, train_data, resumed, "--resume_from_checkpoint", "True"), env, check=True)
    assert f"Resuming from {resumed / f'checkpoint-{resumes_from}'}" in proc.stderr
    assert_losses_equal(reference, resumed)
    assert_finished(resumed)


def test_kill_during_final_save_leaves_no_model_then_resume(reference, tiny_model_dir, train_data, env, work):
    out = killed_run("final_mid_move", tiny_model_dir, train_data, env, work)
    # Some files were moved into place, but not config.json: clearly not a finished model.
    assert (out / saving.FINAL_TMP).is_dir() and not (out / "config.json").exists()
    proc = fine_tune(flags(tiny_model_dir, train_data, out, "--resume_from_checkpoint", "True"), env, check=True)
    assert f"checkpoint-{STEPS}" in proc.stderr
    assert_losses_equal(reference, out)
    assert_finished(out)
    assert load_file(out / "model.safetensors").keys() == load_file(reference / "model.safetensors").keys()


# ----- damaged checkpoints on resume -----


def test_resume_skips_a_damaged_checkpoint_and_refuses_it_by_path(reference, tiny_model_dir, train_data, env,
                                                                   work):
    # Killed after checkpoint-4 was marked complete, before rotation: checkpoint-2 and -4 both complete.
    out = work / "damaged"
    shutil.copytree(killed_run("after_marker", tiny_model_dir, train_data, env, work), out)
    weights = out / "checkpoint-4" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    proc = fine_tune(flags(tiny_model_dir, train_data, out, "--resume_from_checkpoint", str(out / "checkpoint-4")),
                     env)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "checkpoint-4" in line and "model.safetensors" in line, line
    proc = fine_tune(flags(tiny_model_dir, train_data, out, "--resume_from_checkpoint", "True"), env, check=True)
    skipped = [line for line in proc.stderr.splitlines() if "skipping damaged" in line]
    assert len(skipped) == 1 and "checkpoint-4" in skipped[0] and "resuming from checkpoint-2" in skipped[0], skipped
    assert_losses_equal(reference, out)
    assert_finished(out)


# ----- a full disk at each write -----


@pytest.mark.parametrize("point", ["before_save", "after_weights", "after_optimizer", "before_marker"])
def test_disk_full_during_checkpoint_save(point, tiny_model_dir, train_data, env, work):
    out = work / f"enospc-{point}"
    proc = fine_tune(flags(tiny_model_dir, train_data, out), env, fault=f"{point}:enospc:{FAULT_STEP}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert "no space left on the device while writing checkpoint-4" in line, line
    assert "needs about" in line and "the size of checkpoint-2" in line and " free;" in line, line
    assert f"{out / 'checkpoint-2'} is intact" in line, line
    # The previous checkpoint is intact and the half-written one is gone.
    assert [p.name for p in saving.list_checkpoints(out)] == ["checkpoint-2"]
    assert saving.validate_checkpoint(out / "checkpoint-2") is None
    assert not (out / "config.json").exists() and not (out / saving.LOCK_FILE).exists()


@pytest.mark.parametrize("point", ["final_before_save", "final_after_weights", "final_before_move",
                                   "final_mid_move"])
def test_disk_full_during_final_save(point, tiny_model_dir, train_data, env, work):
    out = work / f"enospc-{point}"
    proc = fine_tune(flags(tiny_model_dir, train_data, out), env, fault=f"{point}:enospc:{STEPS}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert f"no space left on the device while writing the final output to {out}" in line, line
    assert "needs about" in line and f"checkpoint-{STEPS} is intact" in line, line
    assert not (out / "config.json").exists() and not (out / saving.FINAL_TMP).exists()
    assert saving.validate_checkpoint(out / f"checkpoint-{STEPS}") is None


# ----- non-finite losses -----


def nan_model(tiny_model_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model_dir, dest)
    for f in dest.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()},
                  f, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("case", ["nan_weights", "huge_learning_rate"])
def test_non_finite_loss_stops_the_run(case, tiny_model_dir, train_data, env, work):
    out = work / f"diverged-{case}"
    if case == "nan_weights":
        args = flags(nan_model(tiny_model_dir, work / "nan-model"), train_data, out, "--save_steps", "1")
    else:
        args = flags(tiny_model_dir, train_data, out, "--save_steps", "1")
        args[args.index("--learning_rate") + 1] = "1e12"
    proc = fine_tune(args, env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert "training diverged at step" in line and "--learning_rate" in line and "--max_grad_norm" in line, line
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    assert "nan" in line or "inf" in line, line
    assert "'loss': 'nan'" in proc.stdout or "'loss': nan" in proc.stdout  # logged as it is, not as 0
    if case == "nan_weights":
        assert step == 1 and "no checkpoint was saved" in line, line
    else:
        assert step > 1 and f"last complete checkpoint: {out / f'checkpoint-{step - 1}'}" in line, line
    # Nothing saved at or after the divergence, no final model, nothing non-finite anywhere.
    assert [p.name for p in saving.list_checkpoints(out)] == [f"checkpoint-{s}" for s in range(1, step)]
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert assert_all_finite(out) == (0 if step == 1 else 3 * (step - 1))


# ----- one writer per output directory -----


def test_two_simultaneous_runs_into_one_directory(tiny_model_dir, train_data, env, work):
    out = work / "contended"
    # The winner pauses in its first checkpoint save, so that it certainly holds the lock while the other starts.
    e = {**env, saving.FAULT_ENV: "before_save:pause=6:2"}
    procs = [subprocess.Popen([sys.executable, str(FINE_TUNE), *map(str, flags(tiny_model_dir, train_data, out))],
                              env=e, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            p.kill()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [r.stderr[-2000:] for r in results]
    winner = next(i for i, r in enumerate(results) if r.returncode == 0)
    loser = results[1 - winner]
    line = error_line(loser)
    assert f"--output_dir {out} is in use by another run (pid {procs[winner].pid} on " in line, line
    assert "Data:" not in loser.stdout  # stopped before data preparation
    assert_finished(out)


def test_resolve_resume_validates_explicit_paths(tmp_path):
    from types import SimpleNamespace

    from baichuan_finetune.options.arguments import UsageError
    from baichuan_finetune.training.train import resolve_resume

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    torch.save({"x": torch.ones(2)}, ckpt / "optimizer.pt")
    saving.mark_checkpoint_complete(ckpt, 3)
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=str(ckpt), overwrite_output_dir=False,
                           process_index=0)
    assert resolve_resume(args) == str(ckpt)
    (ckpt / "trainer_state.json").write_text("{")  # a changed size is found first
    with pytest.raises(UsageError, match=r"checkpoint-3: trainer_state.json has 1 bytes"):
        resolve_resume(args)
    args.resume_from_checkpoint = str(tmp_path / "absent")
    with pytest.raises(UsageError, match="absent: no such checkpoint directory"):
        resolve_resume(args)
    args.resume_from_checkpoint = "True"
    with pytest.raises(UsageError, match=r"no loadable checkpoint in .*checkpoint-3 \(trainer_state.json has"):
        resolve_resume(args)
