"""scripts/train.sh: hostfile validation, ssh check messages, quoting (no shell injection), pass-through."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO_ROOT / "scripts" / "train.sh"
TRAIN_LORA_SH = REPO_ROOT / "scripts" / "train_lora.sh"


def launch(*args, script: Path = TRAIN_SH) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT)


def printed_command(proc: subprocess.CompletedProcess) -> list[str]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return shlex.split(lines[0][2:])


def test_single_node_passes_everything_through():
    proc = launch("--num_gpus", 2, "--dry_run", "--data_path", "my data;rm -rf x.json", "--use_lora", "True")
    assert proc.returncode == 0, proc.stderr
    cmd = printed_command(proc)
    assert cmd[:3] == ["deepspeed", "--num_gpus", "2"]
    assert cmd[-5:] == [str(REPO_ROOT / "fine-tune" / "fine-tune.py"), "--data_path", "my data;rm -rf x.json",
                        "--use_lora", "True"]


def test_train_lora_adds_use_lora():
    cmd = printed_command(launch("--dry_run", "--data_path", "d.json", script=TRAIN_LORA_SH))
    assert cmd[-4:] == ["--data_path", "d.json", "--use_lora", "True"]


def test_hostfile_with_comments_and_master_addr(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# my cluster\n\nlocalhost slots=2   # this node\n")
    cmd = printed_command(launch("--hostfile", hostfile, "--dry_run", "--output_dir", "out"))
    assert cmd[:8] == ["deepspeed", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                       "--master_port", "29500"]


@pytest.mark.parametrize(
    "content, bad_line",
    [
        ("node0 slots=8\nnode1 slots=eight\n", "line 2: 'node1 slots=eight'"),
        ("node0\n", "line 1: 'node0'"),
        ("node0 slots=0\n", "line 1"),
        ("node0 slots=1\n# ok\nnode0 slots=1\n", "line 3: host 'node0' is listed twice"),
    ],
)
def test_bad_hostfile_names_the_line(tmp_path, content, bad_line):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(content)
    proc = launch("--hostfile", hostfile, "--dry_run")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and bad_line in proc.stderr, proc.stderr
    assert "expected 'hostname slots=N'" in proc.stderr or "twice" in proc.stderr


def test_no_shell_injection_through_hostnames_or_values(tmp_path):
    pwned = Path("/tmp") / f"pwned-{uuid.uuid4().hex[:8]}"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"a;touch {pwned} slots=1\n")
    proc = launch("--hostfile", hostfile, "--dry_run")
    assert proc.returncode == 2 and "line 1" in proc.stderr
    hostfile.write_text(f"$(touch {pwned}) slots=1\n")
    assert launch("--hostfile", hostfile, "--dry_run").returncode == 2
    proc = launch("--master_addr", f"a;touch {pwned}", "--dry_run")
    assert proc.returncode == 2 and "--master_addr" in proc.stderr
    # Values for fine-tune.py are passed as separate arguments and printed shell-quoted.
    weird = f"x$(touch {pwned})`touch {pwned}`;touch {pwned}"
    proc = launch("--dry_run", "--output_dir", weird)
    assert printed_command(proc)[-1] == weird
    assert not pwned.exists()


def test_unresolvable_host_names_the_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode-a.invalid slots=8\nnode-b.invalid slots=8\n")
    proc = launch("--hostfile", hostfile, "--dry_run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"hostfile '{hostfile}' line 2: host 'node-a.invalid' does not resolve" in proc.stderr
    assert "--no_ssh_check" in proc.stderr
    proc = launch("--hostfile", hostfile, "--dry_run", "--no_ssh_check")  # skips the host checks, as before
    if shutil.which("pdsh") is None:  # the next requirement of a launch over ssh
        assert proc.returncode == 2 and "pdsh" in proc.stderr
    else:
        assert proc.returncode == 0


@pytest.mark.parametrize("content", ["node-a.invalid slots=1\n", "localhost slots=1\nnode-b.invalid slots=1\n"])
def test_a_single_or_later_unresolvable_host_is_refused(tmp_path, content):
    """The check used to run only for several hosts: a single unreachable host was accepted and its ranks
    retried DNS forever."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(content)
    proc = launch("--hostfile", hostfile, "--dry_run")
    line = content.count("\n")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"line {line}: host 'node-{'ab'[line - 1]}.invalid' does not resolve" in proc.stderr


def test_unreachable_single_host_says_how_to_fix(tmp_path):
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client here")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("198.51.100.7 slots=8\n")  # TEST-NET-2: resolves (a literal), never answers
    proc = launch("--hostfile", hostfile, "--dry_run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "line 1: cannot ssh to '198.51.100.7'" in proc.stderr and "ssh-copy-id" in proc.stderr
    assert "--no_ssh --node_rank" in proc.stderr and "--no_ssh_check" in proc.stderr


def test_single_remote_host_launches_over_ssh(tmp_path):
    """One host other than this machine is launched there (pdsh), not here with a remote rendezvous."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a.invalid slots=2\n")
    proc = launch("--hostfile", hostfile, "--dry_run", "--no_ssh_check")
    if shutil.which("pdsh") is None:
        assert proc.returncode == 2 and "needs pdsh" in proc.stderr, proc.stderr
    else:
        cmd = printed_command(proc)
        assert "--force_multi" in cmd and cmd[cmd.index("--master_addr") + 1] == "node-a.invalid"


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "this machine"])
def test_this_machine_alone_needs_no_ssh(tmp_path, name):
    if name == "this machine":
        name = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{name} slots=2\n")
    cmd = printed_command(launch("--hostfile", hostfile, "--dry_run"))
    assert "--force_multi" not in cmd and cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"


def test_unresolvable_master_addr(tmp_path):
    proc = launch("--master_addr", "rendezvous.invalid", "--dry_run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--master_addr 'rendezvous.invalid': does not resolve" in proc.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    proc = launch("--hostfile", hostfile, "--no_ssh", "--node_rank", 1, "--master_addr", "rendezvous.invalid",
                  "--dry_run")
    assert proc.returncode == 2 and "--master_addr 'rendezvous.invalid': does not resolve" in proc.stderr


def test_one_command_per_node(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    proc = launch("--hostfile", hostfile, "--no_ssh", "--node_rank", 1, "--master_addr", "10.0.0.1", "--dry_run")
    cmd = printed_command(proc)
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"
    assert cmd[cmd.index("--node_rank") + 1] == "1" and "--no_ssh" in cmd
    for args, message in (
        (("--no_ssh", "--master_addr", "10.0.0.1"), "--no_ssh needs --node_rank"),
        (("--no_ssh", "--node_rank", 0), "--no_ssh needs --master_addr"),
        (("--no_ssh", "--node_rank", 2, "--master_addr", "h"), "lists 2 host(s)"),
    ):
        proc = launch("--hostfile", hostfile, *args, "--dry_run")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = launch("--node_rank", 0, "--dry_run")
    assert proc.returncode == 2 and "--no_ssh" in proc.stderr
    proc = launch("--hostfile", tmp_path / "missing", "--dry_run")
    assert proc.returncode == 2 and "no such readable file" in proc.stderr


@pytest.mark.parametrize("script", [TRAIN_SH, TRAIN_LORA_SH])
def test_without_the_environment_says_how_to_get_it(script, tmp_path):
    """No deepspeed on PATH (the venv not active): one line saying what to run, not "command not found"."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(script), "--data_path", "x.json"], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{script.name}: error: deepspeed: "), proc.stderr
    # This checkout's venv (if set up) needs activating; without one, setting it up comes first.
    assert "source .venv/bin/activate" in proc.stderr
    assert ("bash scripts/setup.sh" in proc.stderr) != (REPO_ROOT / ".venv" / "bin" / "deepspeed").exists()
    assert not proc.stdout  # nothing launched
