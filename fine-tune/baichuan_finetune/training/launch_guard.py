"""A rank's ties to its launcher: die with it, report a finished run to it, exit without teardown aborts.

Three faults of a launched run, and what this module does about each:

- **Orphaned ranks.** ``deepspeed`` starts ``runner.py`` -> one ``launch.py`` per node -> the ranks;
  ``torchrun`` starts the ranks itself. Nothing ties a rank's life to its launcher: SIGKILL the runner
  or ``launch.py`` and the ranks train on, unseen. `guard_against_orphaning` sets the Linux
  parent-death signal (``PR_SET_PDEATHSIG``: the kernel sends SIGKILL to the rank when its parent,
  ``launch.py`` or ``torchrun``, dies) and, under ``launch.py``, watches ``launch.py``'s own parent
  (the runner, or the ssh session that started it) from a daemon thread: when it is gone the rank
  logs one line and exits, and ``launch.py`` then stops the other ranks. A training run stops instead as
  on SIGTERM (`preemption`): a checkpoint at the next step boundary, within the grace period.
- **A killed launcher reads as success.** DeepSpeed's runner exits 0 when ``launch.py`` dies by a
  signal (it checks only ``returncode > 0``). ``scripts/train.sh`` therefore names a status file in
  ``BAICHUAN_FINETUNE_STATUS_FILE``; `record_run_finished` writes it (local main process of each node,
  after the final save and barrier), and the script fails a run whose file was never written.
- **Aborts at interpreter teardown.** After a successful save, a rank could still die with
  ``terminate called without an active exception`` (SIGABRT; ``launch.py`` reports -6 as exit 250):
  a C++ thread (a gloo worker of a process group that DeepSpeed still references, say) that needs the
  GIL once Python is finalizing is ended by ``pthread_exit``, whose forced unwinding through a
  ``noexcept`` C++ frame calls ``std::terminate``. `exit_process` runs the ``atexit`` handlers while
  the interpreter is whole, flushes, and ends the process with ``os._exit``: no finalization, no race.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("baichuan_finetune")

STATUS_ENV = "BAICHUAN_FINETUNE_STATUS_FILE"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0
# Exit code of a rank that stops because its launcher is gone: a runtime fault.
ORPHAN_EXIT_CODE = 1


@dataclass(frozen=True)
class Guard:
    """What `guard_against_orphaning` set up: the launcher process and, for DeepSpeed, its parent."""

    launcher_pid: int
    launcher: str  # "deepspeed" (launch.py) or "torchrun"
    watched_pid: int | None  # launch.py's parent, watched by a thread; None where nothing is watched


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _proc_ppid(pid: int) -> int | None:
    """The parent pid of `pid` from ``/proc/<pid>/stat``, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def launcher_kind(cmdline: list[str]) -> str | None:
    """``"deepspeed"`` for DeepSpeed's per-node ``launch.py``, ``"torchrun"`` for torchrun / torch's
    launchers, None for anything else (a shell, pytest, a user's own script)."""
    joined = " ".join(cmdline)
    if "deepspeed.launcher.launch" in cmdline or "deepspeed/launcher/launch.py" in joined:
        return "deepspeed"
    if any(arg.endswith("torchrun") for arg in cmdline[:2]) or any(
        arg in ("torch.distributed.run", "torch.distributed.launch") for arg in cmdline
    ):
        return "torchrun"
    return None


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _gone(message: str) -> None:
    """Log one line and end this rank now (from any thread: the main one may sit in a collective)."""
    print(f"[rank {os.environ.get('RANK', '?')}] {message}; exiting", file=sys.stderr, flush=True)
    os._exit(ORPHAN_EXIT_CODE)


def _stop_like_sigterm(message: str) -> bool:
    """Stop the run as SIGTERM would (a checkpoint at the next step boundary, see `preemption`) when a
    training run installed its handlers; False otherwise. Looked up, not imported: a process that never
    imported `preemption` has no handler."""
    preemption = sys.modules.get(f"{__package__}.preemption")
    return preemption is not None and preemption.request_stop(f"{message}; stopping at the next step")


def _watch(launcher_pid: int, watched_pid: int | None, poll: float) -> None:
    while True:
        time.sleep(poll)
        if os.getppid() != launcher_pid:  # the parent-death signal should have come first; belt and braces
            _gone(f"launcher (pid {launcher_pid}) is gone")
        launcher_parent = _proc_ppid(launcher_pid)
        if launcher_parent is None:
            _gone(f"launcher (pid {launcher_pid}) is gone")
        if watched_pid is not None and launcher_parent != watched_pid:
            # launch.py was reparented: the runner that started it (or the ssh session) died. A SIGTERM
            # to the runner (scripts/train.sh passes its TERM/INT on to it, and Kubernetes signals only
            # the container's first process) ends it at once, so this is how most stops reach a rank:
            # stop as SIGTERM does (bounded by the grace period), with launch.py still here to wait.
            message = f"the deepspeed runner (pid {watched_pid}) that started this node's launcher is gone"
            if not _stop_like_sigterm(f"[rank {os.environ.get('RANK', '?')}] {message}"):
                _gone(message)
            watched_pid = None  # asked once; launch.py's own death still ends this rank


def guard_against_orphaning(poll: float = POLL_SECONDS) -> Guard | None:
    """Tie this process's life to its launcher (Linux; a no-op elsewhere or without a launcher).

    Only a process whose parent is ``launch.py`` or ``torchrun`` is guarded: a run started from a
    shell, or ``main()`` called inside pytest, is left alone.
    """
    if not sys.platform.startswith("linux"):
        return None
    launcher_pid = os.getppid()
    kind = launcher_kind(_proc_cmdline(launcher_pid))
    if kind is None:
        return None
    # SIGKILL, not SIGTERM: a rank blocked in a C++ collective never runs a Python handler, and with
    # its launcher gone nobody is left to collect a tidier exit (checkpoints are guarded by markers).
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        _gone(f"launcher (pid {launcher_pid}) is gone")
    watched = None
    if kind == "deepspeed":
        runner = _proc_ppid(launcher_pid)
        # Started under init or a subreaper already: there is no runner to lose.
        watched = runner if runner not in (None, 0, 1) else None
    threading.Thread(target=_watch, args=(launcher_pid, watched, poll), name="launcher-watch", daemon=True).start()
    return Guard(launcher_pid, kind, watched)


# ----- the status file of scripts/train.sh -----


def record_run_finished(output_dir: str, local_process_index: int) -> None:
    """Tell the launcher script that this node's run finished and saved (local main process only).

    Called after the final save and barrier; a no-op unless ``BAICHUAN_FINETUNE_STATUS_FILE`` is set.
    """
    path = os.environ.get(STATUS_ENV)
    if not path or local_process_index != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"status": "finished", "output_dir": str(output_dir), "time": time.time()}, f)
        f.write("\n")
    os.replace(tmp, path)  # whole or absent: the script never reads half a line


# ----- leaving -----


def exit_process(code: int) -> None:
    """End the process with `code` without interpreter finalization (see the module docstring).

    ``atexit`` handlers (logging, report integrations) still run, while every module is alive.
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(code)
