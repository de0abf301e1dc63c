"""SIGTERM and SIGINT: stop at the next optimizer step with a complete checkpoint, or leave nothing behind.

Schedulers stop a job with SIGTERM (Slurm, Kubernetes) and a user with Ctrl-C (SIGINT); SIGKILL follows
after a delay (Slurm's ``KillWait``, Kubernetes' ``terminationGracePeriodSeconds``, DeepSpeed's
``launch.py``: 30 s each by default). What a signal does depends on the phase of the run:

- **Before training** (parsing, preflight, data preparation, model loading, DeepSpeed set-up): the
  handler raises `Preempted`; the ``finally`` blocks on the way out release the output-dir lock and
  remove the directories the run created, and `train.main` prints one line (no traceback).
- **Training**: the handler only records the signal. At the next optimizer-step boundary every process
  learns it through a one-element all-reduce (a signal may reach only some ranks: DeepSpeed's
  ``launch.py`` forwards it to one rank at a time), all save a checkpoint through the normal checkpoint
  path (`trainer.BaichuanTrainer._save_checkpoint`: marker and rotation as always), and `Preempted` is
  raised once it is complete; `train.main` prints the step, the checkpoint and the resume command.
  When no step boundary is reached within the grace period (``BAICHUAN_FINETUNE_PREEMPT_GRACE`` seconds,
  default `DEFAULT_GRACE_SECONDS`), the process exits with one line and saves nothing: the complete
  checkpoints already written stay valid.
- **Final save** (training finished): the signal is noted and the final output is finished.

A second signal exits at once (one line, no traceback, nothing more saved), unless it comes within
`SAME_SIGNAL_SECONDS` of the first: launchers pass one signal on to ranks that got it already
(``launch.py`` sends SIGTERM to ranks that Ctrl-C or Slurm reached directly).

Exit code: ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), whether or not a checkpoint was
saved; the printed line says which. Forked workers (the tokenizing pool) inherit the handler and die
quietly by the default action; their parent handles the signal.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass

from transformers import TrainerCallback

from ..options.arguments import PROG

GRACE_ENV = "BAICHUAN_FINETUNE_PREEMPT_GRACE"
DEFAULT_GRACE_SECONDS = 30.0
SAME_SIGNAL_SECONDS = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)

SETUP, TRAINING, SAVING, FINISHING = "setup", "training", "saving", "finishing"


class Preempted(BaseException):
    """The run stopped on a signal. A BaseException, as KeyboardInterrupt is: no ``except Exception`` on
    the way out swallows it. `message` is the one line to print, `code` the exit code."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.message = message

    @property
    def code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """The exit code of a run stopped by `signum`: the shell's convention, 128 + the signal number."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@dataclass
class _State:
    pid: int  # the process that installed the handlers (forked workers have another pid)
    previous: dict  # signal -> handler before install()
    phase: str = SETUP
    signum: int | None = None  # the first signal received
    received_at: float = 0.0
    grace_timer: threading.Timer | None = None
    output_dir: str | None = None


_state: _State | None = None
_lock = threading.Lock()


def grace_seconds() -> float:
    """The grace period from ``$BAICHUAN_FINETUNE_PREEMPT_GRACE`` (seconds), else the default."""
    value = os.environ.get(GRACE_ENV, "")
    try:
        grace = float(value) if value.strip() else DEFAULT_GRACE_SECONDS
    except ValueError:
        grace = DEFAULT_GRACE_SECONDS
    return grace if grace > 0 else DEFAULT_GRACE_SECONDS


def _say(line: str, every_rank: bool = False) -> None:
    # Only the first process of a node speaks, as for every other error of the run. os.write, not print:
    # a signal handler may have interrupted a print to the same stream (a reentrant write would raise).
    if every_rank or int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0:
        try:
            os.write(2, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


def _last_checkpoint_text() -> str:
    from ..checkpoints import saving

    last = saving.last_complete_checkpoint(_state.output_dir) if _state and _state.output_dir else None
    return f"last complete checkpoint: {last}" if last is not None else "no checkpoint was saved"


def _exit_now(signum: int, why: str) -> None:
    """One line, then exit without unwinding (the main thread may be inside a collective)."""
    _say(f"{PROG}: {why}; exiting without saving ({_last_checkpoint_text()})")
    os._exit(exit_code(signum))


def _handler(signum: int, frame) -> None:
    state = _state
    if state is None or os.getpid() != state.pid:
        # A forked worker: die by the default action, silently; the parent handles the signal.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    now = time.monotonic()
    if state.signum is not None:
        if now - state.received_at < SAME_SIGNAL_SECONDS:
            return  # the same stop, passed on by a launcher
        _exit_now(signum, f"second signal ({signal_name(signum)})")
    state.signum, state.received_at = signum, now
    if state.phase == SETUP:
        raise Preempted(signum, f"{PROG}: stopped by {signal_name(signum)} before training started; "
                                "nothing was trained, nothing is left behind")
    if state.phase == TRAINING:
        _say(f"{PROG}: {signal_name(signum)}: saving a checkpoint at the end of this step "
             "(a second signal exits at once)")
        grace = grace_seconds()
        timer = threading.Timer(grace, _grace_expired, args=(signum, grace))
        timer.daemon = True
        state.grace_timer = timer
        timer.start()
    elif state.phase == FINISHING:
        _say(f"{PROG}: {signal_name(signum)}: training is finished; writing the final output first "
             "(a second signal exits at once)")


def _grace_expired(signum: int, grace: float) -> None:
    with _lock:
        if _state is None or _state.phase != TRAINING:
            return  # the save started (or the run ended) in time
    _exit_now(signum, f"{signal_name(signum)}: no step boundary within the grace period of {grace:g}s "
                      f"(${GRACE_ENV})")


def install() -> None:
    """Take over SIGTERM and SIGINT for this run (main thread only; a no-op elsewhere)."""
    global _state
    if threading.current_thread() is not threading.main_thread():
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _state = _State(pid=os.getpid(), previous=previous)
    for sig in SIGNALS:
        if previous[sig] is signal.SIG_IGN:
            continue  # ignored on purpose (nohup, a background job of a script): leave it so
        signal.signal(sig, _handler)


def uninstall() -> None:
    """Give SIGTERM and SIGINT back to whoever had them before `install` (a test's process, say)."""
    global _state
    state = _state
    if state is None or os.getpid() != state.pid:
        return
    with _lock:
        if state.grace_timer is not None:
            state.grace_timer.cancel()
        _state = None
    if threading.current_thread() is threading.main_thread():
        for sig, handler in state.previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def set_output_dir(output_dir: str) -> None:
    """Where the run's checkpoints are (named in the lines printed on the way out)."""
    if _state is not None:
        _state.output_dir = output_dir


def _set_phase(phase: str) -> None:
    with _lock:
        if _state is not None:
            _state.phase = phase
            if phase != TRAINING and _state.grace_timer is not None:
                _state.grace_timer.cancel()


def training_finished() -> None:
    """The training loop ended normally: a signal from now on lets the final save finish."""
    _set_phase(FINISHING)


def requested() -> int | None:
    """The signal this process received, or None."""
    return _state.signum if _state is not None else None


def request_stop(message: str) -> bool:
    """Stop this run as SIGTERM would, from any thread (`launch_guard` calls it when the DeepSpeed runner
    is gone); False when no handler is installed (the caller then exits by itself)."""
    state = _state
    if state is None or os.getpid() != state.pid or signal.getsignal(signal.SIGTERM) is not _handler:
        return False
    if state.signum is None:  # else a stop is under way already: this is the same one
        _say(message, every_rank=True)
        os.kill(os.getpid(), signal.SIGTERM)  # runs the handler in the main thread
    return True


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: `argv` (``sys.argv``) without the launcher's
    ``--local_rank`` and with ``--resume_from_checkpoint True``."""
    args, i = [], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank"):
            i += 1 if "=" in arg else 2
            continue
        if arg.startswith("--resume_from_checkpoint"):
            i += 1 if "=" in arg else 2
            continue
        args.append(arg)
        i += 1
    launched = "LOCAL_RANK" in os.environ
    head = ["deepspeed", "..."] if launched else ["python"]
    return shlex.join([*head, argv[0], *args, "--resume_from_checkpoint", "True"])


class StopOnSignal(TrainerCallback):
    """The training side: on at the start of training, at each optimizer step all processes agree on
    whether any received a signal (a collective), and then save a checkpoint and raise `Preempted`."""

    def __init__(self):
        self._stop_step: int | None = None
        self._signum = signal.SIGTERM

    def on_train_begin(self, args, state, control, **kwargs):
        set_output_dir(args.output_dir)
        _set_phase(TRAINING)

    def on_step_end(self, args, state, control, **kwargs):
        signum = requested()
        mine = signum if signum is not None else 0
        agreed = _any_process(mine, args.device)
        if not agreed:
            return control
        with _lock:
            if _state is not None:
                _state.phase = SAVING  # the grace timer stands down: the save has started
                if _state.grace_timer is not None:
                    _state.grace_timer.cancel()
        self._stop_step = state.global_step
        self._signum = agreed
        control.should_save = True
        control.should_log = True  # the loss since the last log line is kept in the checkpoint
        control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self._stop_step is None or state.global_step != self._stop_step:
            return control
        from ..checkpoints import saving

        path = saving.checkpoint_path(args.output_dir, state.global_step)
        raise Preempted(self._signum, f"{PROG}: stopped by {signal_name(self._signum)} at step "
                                      f"{state.global_step}: saved {path}; resume with: {resume_command(sys.argv)}")


def _any_process(signum: int, device) -> int:
    """The largest signal number any process received (0: none). A collective when distributed."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return signum
    flag = torch.tensor([signum], dtype=torch.long, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())

