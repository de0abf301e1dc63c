"""Ranks die with their launcher; a killed per-node launcher fails the run (launch_guard, scripts/train.sh).

Cheap tests first (launcher detection, the status file, train.sh's decisions with a stand-in for the
`deepspeed` command), then the real thing: the real `deepspeed` CLI with ranks that only sleep, and
real CPU training runs killed mid-training.
"""

from __future__ import annotations

import importlib.util
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
TRAIN_SH = REPO_ROOT / "scripts" / "train.sh"
FINE_TUNE = REPO_ROOT / "fine-tune" / "fine-tune.py"
LAUNCH_GUARD = REPO_ROOT / "fine-tune" / "baichuan_finetune" / "training" / "launch_guard.py"
BIN = Path(sys.executable).parent
GONE_WITHIN = 8.0  # seconds: the watcher polls every second; a loaded 2-core machine is slow


def _load_launch_guard():
    spec = importlib.util.spec_from_file_location("launch_guard_under_test", LAUNCH_GUARD)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lg = _load_launch_guard()


def base_env(**extra) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", lg.STATUS_ENV):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = GONE_WITHIN) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----- launcher detection and the status file -----


@pytest.mark.parametrize("cmdline, kind", [
    (["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "train.py"], "deepspeed"),
    (["python", "/venv/lib/python3.11/site-packages/deepspeed/launcher/launch.py", "x.py"], "deepspeed"),
    (["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "x.py"], "torchrun"),
    (["python", "-m", "torch.distributed.run", "x.py"], "torchrun"),
    (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "x.py"], None),  # the runner is no parent of ranks
    (["bash"], None),
    (["python", "-m", "pytest", "tests/training/test_train.py"], None),
    ([], None),
])
def test_launcher_kind(cmdline, kind):
    assert lg.launcher_kind(cmdline) == kind


def test_no_guard_without_a_launcher():
    """pytest (this process) is not launched by a launcher: nothing is set up, nothing watches it."""
    assert lg.guard_against_orphaning() is None


def test_status_file_written_by_the_local_main_process_only(tmp_path, monkeypatch):
    status = tmp_path / "status"
    monkeypatch.setenv(lg.STATUS_ENV, str(status))
    lg.record_run_finished("out", local_process_index=1)
    assert not status.exists()
    lg.record_run_finished("out", local_process_index=0)
    assert json.loads(status.read_text())["status"] == "finished"
    assert [p.name for p in tmp_path.iterdir()] == ["status"]  # no temporary file left
    monkeypatch.delenv(lg.STATUS_ENV)
    status.unlink()
    lg.record_run_finished("out", local_process_index=0)  # not launched by train.sh: nothing to write
    assert not status.exists()


# ----- scripts/train.sh's decision, with a stand-in `deepspeed` on PATH -----

FAKE_DEEPSPEED = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in for the deepspeed runner: what scripts/train.sh sees of a run, by FAKE_DS_MODE.
    finish() {{ "{python}" -c 'import importlib.util, sys
    spec = importlib.util.spec_from_file_location("lg", sys.argv[1]); m = importlib.util.module_from_spec(spec)
    sys.modules["lg"] = m; spec.loader.exec_module(m); m.record_run_finished("out", 0)' "{launch_guard}"; }}
    case "$FAKE_DS_MODE" in
    finish) finish; exit 0 ;;
    killed) exit 0 ;;          # launch.py died by a signal: the real runner exits 0
    fail) exit 3 ;;
    finish_then_abort) finish; exit 250 ;;
    sleep) echo "$$" > "$FAKE_DS_PIDFILE"; exec sleep 120 ;;
    esac
    exit 99
""")


@pytest.fixture()
def fake_deepspeed(tmp_path) -> Path:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "deepspeed"
    script.write_text(FAKE_DEEPSPEED.format(python=sys.executable, launch_guard=LAUNCH_GUARD))
    script.chmod(0o755)
    return bin_dir


def fake_env(bin_dir: Path, mode: str, **extra) -> dict:
    env = base_env(FAKE_DS_MODE=mode, **extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.parametrize("mode, code, message", [
    ("finish", 0, None),
    ("killed", 1, "deepspeed exited 0 but the training on this node did not finish"),
    ("fail", 3, None),
    ("finish_then_abort", 250, "the run had finished and saved its output before deepspeed exited 250"),
])
def test_train_sh_fails_a_run_that_did_not_finish(fake_deepspeed, tmp_path, mode, code, message):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run(["bash", str(TRAIN_SH), "--num_gpus", "1", "--output_dir", "out"],
                          env=fake_env(fake_deepspeed, mode, TMPDIR=str(tmp)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == code, proc.stderr
    if message is None:
        assert proc.stderr == ""
    else:
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert list(tmp.iterdir()) == []  # the status file is removed on every exit


def test_train_sh_passes_a_term_to_the_runner(fake_deepspeed, tmp_path):
    """train.sh no longer execs deepspeed (it checks the status after): a TERM must still stop the runner."""
    pidfile = tmp_path / "runner.pid"
    proc = subprocess.Popen(["bash", str(TRAIN_SH), "--num_gpus", "1"], env=fake_env(fake_deepspeed, "sleep",
                            FAKE_DS_PIDFILE=str(pidfile)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        runner = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "the stand-in runner"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert wait_gone([runner]) == []
    finally:
        proc.kill()
        proc.wait()


# ----- the real deepspeed CLI with ranks that only sleep -----

SLEEPER = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("lg", {launch_guard!r})
    lg = importlib.util.module_from_spec(spec); sys.modules["lg"] = lg; spec.loader.exec_module(lg)
    guard = lg.guard_against_orphaning()
    # One write per line: both ranks share one unbuffered log, and a multi-argument print
    # writes word by word, so the ranks' words could interleave.
    line = "GUARD %s %s %s\\n" % (os.getpid(), guard.launcher if guard else None, guard.watched_pid if guard else None)
    os.write(1, line.encode())
    time.sleep(300)
""")


def sleeper_script(tmp_path: Path) -> Path:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER.format(launch_guard=str(LAUNCH_GUARD)))
    return script


def wait_for_guarded_ranks(log: Path) -> list[list[str]]:
    """The first two ``GUARD pid launcher watched`` lines of the sleeping ranks, split into words."""

    def two_lines():
        lines = [ln.split() for ln in log.read_text().splitlines() if ln.startswith("GUARD")]
        return lines[:2] if len(lines) >= 2 else None

    return wait_for(two_lines, 120, "two guarded ranks", log)


def start_sleepers(tmp_path: Path):
    script = sleeper_script(tmp_path)
    log = tmp_path / "deepspeed.log"
    with open(log, "w") as out:
        runner = subprocess.Popen([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                                   str(script)], env=base_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    ranks = wait_for_guarded_ranks(log)
    launchers = [p for p in descendants(runner.pid) if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    assert len(launchers) == 1
    return runner, launchers[0].pid, ranks, log


def test_sleeping_ranks_die_with_the_runner(tmp_path):
    runner, launcher, ranks, log = start_sleepers(tmp_path)
    pids = [int(r[1]) for r in ranks]
    try:
        # Guarded as DeepSpeed ranks, watching the runner (launch.py's parent).
        assert [r[2:] for r in ranks] == [["deepspeed", str(runner.pid)]] * 2
        runner.kill()
        runner.wait()
        assert wait_gone([*pids, launcher]) == [], log.read_text()[-2000:]
        assert "the deepspeed runner (pid" in log.read_text()
    finally:
        kill_all([*pids, launcher])


def test_sleeping_ranks_die_with_their_node_launcher(tmp_path):
    runner, launcher, ranks, log = start_sleepers(tmp_path)
    pids = [int(r[1]) for r in ranks]
    try:
        os.kill(launcher, signal.SIGKILL)  # the parent-death signal kills the ranks at once
        assert wait_gone(pids, timeout=3) == []
        # What scripts/train.sh has to make up for: the runner calls this a success.
        assert runner.wait(timeout=30) == 0
    finally:
        kill_all([*pids, launcher, runner.pid])


def test_sleeping_ranks_die_with_torchrun(tmp_path):
    script = sleeper_script(tmp_path)
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        torchrun = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                                     str(script)], env=base_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    pids: list[int] = []
    try:
        ranks = wait_for_guarded_ranks(log)
        pids = [int(r[1]) for r in ranks]
        assert [r[2:] for r in ranks] == [["torchrun", "None"]] * 2
        torchrun.kill()
        torchrun.wait()
        assert wait_gone(pids, timeout=3) == []
    finally:
        kill_all([*pids, torchrun.pid])


# ----- real CPU training, killed mid-training -----


def training_flags(tiny_model_dir: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(tiny_model_dir), "--data_path",
            str(REPO_ROOT / "data" / "examples" / "sharegpt.jsonl"), "--output_dir", str(out), "--report_to", "none",
            "--model_max_length", "128", "--per_device_train_batch_size", "1", "--max_steps", "100000",
            "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True",
            "--preprocessing_num_workers", "1", "--use_lora", "True", "--lora_r", "4",
            "--deepspeed", str(REPO_ROOT / "ds_config_zero2.json")]


def training_ranks(root_pid: int) -> list[int]:
    """The fine-tune.py processes under `root_pid` (launch.py gives each a --local_rank; the runner has none)."""
    return [p.pid for p in descendants(root_pid)
            if str(FINE_TUNE) in p.cmdline() and any(a.startswith("--local_rank") for a in p.cmdline())]


def test_killing_the_deepspeed_runner_mid_training_leaves_no_rank(tiny_model_dir, tmp_path):
    log = tmp_path / "train.log"
    env = base_env(BAICHUAN_FINETUNE_CACHE=str(tmp_path / "cache"))
    with open(log, "w") as out:
        runner = subprocess.Popen([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                                   str(FINE_TUNE), *training_flags(tiny_model_dir, tmp_path / "out")],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ranks: list[int] = []
    try:
        wait_for(lambda: "'loss'" in log.read_text(errors="replace") or runner.poll() is not None, 300,
                 "the first training step", log)
        assert runner.poll() is None, log.read_text()[-3000:]
        ranks = training_ranks(runner.pid)
        assert len(ranks) == 2
        launchers = [p.pid for p in descendants(runner.pid) if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        runner.kill()  # SIGKILL: the runner gets no chance to clean up
        runner.wait()
        assert wait_gone([*ranks, *launchers]) == [], log.read_text()[-3000:]
        assert "the deepspeed runner (pid" in log.read_text()
    finally:
        kill_all(ranks)
        os.killpg(runner.pid, signal.SIGKILL) if runner.poll() is None else None


def test_train_sh_fails_when_the_node_launcher_is_killed(tiny_model_dir, tmp_path):
    log, err = tmp_path / "train.log", tmp_path / "train.err"
    env = base_env(BAICHUAN_FINETUNE_CACHE=str(tmp_path / "cache"))
    with open(log, "w") as out, open(err, "w") as errors:  # files, not pipes: nobody reads during training
        script = subprocess.Popen(["bash", str(TRAIN_SH), "--num_gpus", "1", "--master_port", str(free_port()),
                                   *training_flags(tiny_model_dir, tmp_path / "out")],
                                  env=env, stdout=out, stderr=errors, start_new_session=True)
    ranks: list[int] = []
    try:
        wait_for(lambda: "'loss'" in log.read_text(errors="replace") or script.poll() is not None, 300,
                 "the first training step", log)
        assert script.poll() is None, log.read_text()[-3000:]
        ranks = training_ranks(script.pid)
        launchers = [p.pid for p in descendants(script.pid) if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        assert len(ranks) == 1 and len(launchers) == 1
        os.kill(launchers[0], signal.SIGKILL)
        assert script.wait(timeout=60) == 1, err.read_text()[-3000:]
        stderr = err.read_text()
        # The script's verdict is its last line (the ranks' logs come before it).
        assert stderr.strip().splitlines()[-1] == (
            "train.sh: error: deepspeed exited 0 but the training on this node did not finish (its launch.py or a "
            "rank was killed?): this run saved no final output"), stderr[-3000:]
        assert "Traceback" not in stderr
        assert wait_gone(ranks) == []
        assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    finally:
        kill_all(ranks)
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
