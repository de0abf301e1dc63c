"""SIGTERM and SIGINT (preemption.py): during training a complete checkpoint at the next step boundary on
every rank, one line and exit code 128 + signal, then a resume that trains as if never stopped; before
training one line and no output directory; a second signal exits at once.

The runs hold at a known point (the end of a given step, or the Trainer's construction) until the signal has
reached the process, through a callback given to ``main()``; nothing of the run itself is replaced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from baichuan_finetune.training import preemption
from baichuan_finetune.checkpoints import saving
from test_train import (BIN, FINE_TUNE, REPO_ROOT, RUN_TIMEOUT, common_flags, env, free_port,  # noqa: F401
                        losses, run, train_data, work)

STEPS, AT = 4, 2

# fine-tune's main() with a callback that holds at HOLD_AT ("init": the Trainer is built, training has not
# started; a number: the end of that optimizer step), on the ranks in HOLD_RANKS, until this process has
# received a signal (HOLD=signal) or for good (HOLD=forever), after writing READY.<rank> for the test.
HOLDING_MAIN = textwrap.dedent(f"""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {str(FINE_TUNE.parent)!r})
    from transformers import TrainerCallback
    from baichuan_finetune.training import preemption
    from baichuan_finetune.training.launch_guard import exit_process
    from baichuan_finetune.training.train import main

    def hold():
        if os.environ.get("RANK", "0") not in os.environ["HOLD_RANKS"].split(","):
            return
        Path(os.environ["READY"] + "." + os.environ.get("RANK", "0")).touch()
        deadline = time.monotonic() + 60  # a stuck test fails, it does not hang
        while time.monotonic() < deadline and (os.environ["HOLD"] == "forever" or preemption.requested() is None):
            time.sleep(0.05)

    class Hold(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            if os.environ["HOLD_AT"] == "init":
                hold()

        def on_step_end(self, args, state, control, **kwargs):
            if os.environ["HOLD_AT"] == str(state.global_step):
                hold()

    exit_process(main(sys.argv[1:], callbacks=[Hold()]))
""")


def holding_env(env: dict, work: Path, name: str, at: str, hold: str = "signal", ranks: str = "0") -> dict:
    ready = work / f"{name}.ready"
    return {**env, "HOLD_AT": at, "HOLD": hold, "HOLD_RANKS": ranks, "READY": str(ready)}


def wait_for(path: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached {path.name} (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def signal_and_wait(proc: subprocess.Popen, log: Path, send) -> str:
    """`send()` the signal(s), then wait until the run and every process it started are gone; the log."""
    import psutil

    started = psutil.Process(proc.pid).children(recursive=True)
    send()
    try:
        proc.wait(timeout=RUN_TIMEOUT)  # (Popen reaps its own child: psutil would take its exit code)
        _, alive = psutil.wait_procs(started, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        alive = [proc]
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not stop after the signal:\n{log.read_text()[-4000:]}")
    return log.read_text()


def our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("fine-tune.py: ")]


def start(cmd: list, env: dict, work: Path, name: str) -> tuple[subprocess.Popen, Path]:
    script = work / "holding_main.py"
    script.write_text(HOLDING_MAIN)
    log = work / f"{name}.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads during training
        proc = subprocess.Popen([str(c).replace(str(FINE_TUNE), str(script)) for c in cmd], env=env, cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


# ----- 2 processes, ZeRO-3, the DeepSpeed launcher: stop, save, resume as if never stopped -----


def launch(model_and_data: tuple[Path, Path], out: Path, *extra) -> list:
    return [BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), FINE_TUNE,
            *common_flags(*model_and_data, out), "--max_steps", str(STEPS), "--save_strategy", "no", *extra]


@pytest.fixture(scope="module")
def model_and_data(tiny_model_dir, train_data) -> tuple[Path, Path]:
    return tiny_model_dir, train_data


def stop(model_and_data, out: Path, env: dict, work: Path, at: int, send_to: str, *extra) -> str:
    """Launch 2 processes, hold rank 0 at the end of step `at`, send the signal; the log, after checking
    the run's lines: the signal acknowledged, then the step, the checkpoint and the resume command."""
    import psutil

    sig = signal.SIGTERM if send_to == "runner" else signal.SIGINT
    e = holding_env(env, work, out.name + str(at), str(at))
    proc, log = start(launch(model_and_data, out, *extra), e, work, out.name + str(at))
    wait_for(Path(e["READY"] + ".0"), proc, log)

    def send():
        if send_to == "runner":
            proc.send_signal(sig)
        else:
            # As a terminal's Ctrl-C: the ranks get it from the kernel before launch.py's SIGTERM follows.
            children = psutil.Process(proc.pid).children(recursive=True)
            for p in sorted(children, key=lambda p: "deepspeed.launcher.launch" in " ".join(p.cmdline())):
                os.kill(p.pid, sig)

    text = signal_and_wait(proc, log, send)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    lines = our_lines(text)
    assert lines[0].startswith(f"fine-tune.py: {sig.name}: saving a checkpoint at the end of this step"), text[-4000:]
    assert len(lines) == 2 and lines[1].startswith(f"fine-tune.py: stopped by {sig.name} at step {at}: saved "
                                                   f"{out / f'checkpoint-{at}'}; resume with: "), text[-4000:]
    assert lines[1].endswith("--resume_from_checkpoint True")
    assert saving.last_complete_checkpoint(out) == out / f"checkpoint-{at}"
    assert not (out / "trainer_state.json").exists()  # stopped, not finished
    return text


def test_sigint_then_sigterm_each_save_and_the_resumed_run_trains_as_if_never_stopped(model_and_data, env, work):
    ref = work / "ref"
    run(launch(model_and_data, ref), env)
    out = work / "stopped"
    # Ctrl-C under scripts/train.sh: SIGINT reaches DeepSpeed's launch.py and the ranks (the runner, a
    # background job of the script, ignores it); launch.py passes a SIGTERM on to rank 0 as well.
    stop(model_and_data, out, env, work, 1, "ranks")
    # SIGTERM to the runner (what train.sh passes on, and Kubernetes sends to a container's first process)
    # ends it at once; the ranks see their launcher orphaned and stop as on SIGTERM.
    text = stop(model_and_data, out, env, work, 2, "runner", "--resume_from_checkpoint", "True")
    assert f"exits with return code = {preemption.exit_code(signal.SIGTERM)}" in text  # launch.py, of a rank
    proc = run(launch(model_and_data, out, "--resume_from_checkpoint", "True"), env)
    assert f"Resuming from {out / 'checkpoint-2'}" in proc.stdout + proc.stderr
    a, b = losses(ref), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a, b)


# ----- one process: a second signal, and signals before training -----


def single_flags(tiny_model_dir: Path, train_data: Path, out: Path) -> list:
    return [sys.executable, FINE_TUNE, "--model_name_or_path", tiny_model_dir, "--data_path", train_data,
            "--output_dir", out, "--report_to", "none", "--model_max_length", "64",
            "--per_device_train_batch_size", "2", "--max_steps", str(STEPS), "--save_strategy", "no",
            "--disable_tqdm", "True"]


@pytest.mark.parametrize("how", ["second_signal", "grace_period"])
def test_a_step_that_never_ends_exits_without_saving(how, tiny_model_dir, train_data, env, work):
    """The run holds at the end of a step for good, so no save can start: a second signal, or the end of
    the grace period, ends it at once with one line and nothing saved."""
    out = work / how
    e = holding_env(env, work, how, str(AT), hold="forever")
    if how == "grace_period":
        e[preemption.GRACE_ENV] = "1"
    proc, log = start(single_flags(tiny_model_dir, train_data, out), e, work, how)
    wait_for(Path(e["READY"] + ".0"), proc, log)
    if how == "second_signal":
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "saving a checkpoint at the end of this step" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(preemption.SAME_SIGNAL_SECONDS + 0.5)  # a signal sooner than this counts as the same stop
        text, sig = signal_and_wait(proc, log, lambda: proc.send_signal(signal.SIGINT)), signal.SIGINT
        expected = "fine-tune.py: second signal (SIGINT); exiting without saving (no checkpoint was saved)"
    else:
        text, sig = signal_and_wait(proc, log, lambda: proc.send_signal(signal.SIGTERM)), signal.SIGTERM
        expected = ("fine-tune.py: SIGTERM: no step boundary within the grace period of 1s "
                    f"(${preemption.GRACE_ENV}); exiting without saving (no checkpoint was saved)")
    assert proc.returncode == preemption.exit_code(sig)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    assert our_lines(text)[-1] == expected, text[-3000:]
    assert not saving.list_checkpoints(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_training_leaves_no_output_dir(sig, tiny_model_dir, train_data, env, work):
    out = work / f"early-{sig.name}"  # created by the run
    e = holding_env(env, work, f"early-{sig.name}", "init")
    proc, log = start(single_flags(tiny_model_dir, train_data, out), e, work, f"early-{sig.name}")
    wait_for(Path(e["READY"] + ".0"), proc, log)
    assert (out / saving.LOCK_FILE).is_file()  # held while the data is prepared and the model loaded
    text = signal_and_wait(proc, log, lambda: proc.send_signal(sig))
    assert proc.returncode == preemption.exit_code(sig)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    assert our_lines(text) == [f"fine-tune.py: stopped by {sig.name} before training started; nothing was "
                               "trained, nothing is left behind"], text[-3000:]
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))
