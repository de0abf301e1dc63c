"""Checkpoints that are known complete, final output directories that load anywhere, and one writer
per output directory.

**Checkpoints are transactions.** A checkpoint directory ``checkpoint-N`` counts only once its
completion marker exists. Before ``checkpoint-N`` is (re)written, its marker is removed and any old
content set aside; the marker is written last, by the main process, after every process has written
its shards, and lists every file with its size and sha256. Rotation (``--save_total_limit``) runs only after the
new checkpoint is complete and never deletes the newest complete one. A run killed while writing a
checkpoint therefore never resumes from the half-written one, and `validate_checkpoint` checks a
checkpoint before a resume trusts it (every file listed, none added, sizes and sha256 as recorded,
``trainer_state.json`` parses, every safetensors header and torch zip directory readable, and no torch
pickle asking for more than tensors and plain values: see `checkpoint_trust`).

**The final directory** of a full fine-tune holds consolidated safetensors (gathered from ZeRO-3, no
``zero_to_fp32.py``); a LoRA run holds exactly the trained adapter weights. Both also get the
tokenizer, the chat generation config and the model code, so ``from_pretrained(dir,
trust_remote_code=True)`` works where this package is not installed, and one ``model_max_length``
in ``config.json`` and ``tokenizer_config.json``. `finish_output_dir` does that, for training runs
and for merged adapters alike. `final_output` writes it all into a temporary directory inside
``output_dir`` and then moves the files into place, the file that makes it loadable
(``config.json`` / ``adapter_config.json``) last: the directory is either complete or clearly not a
model.

**One writer per output directory**: `OutputDirLock` (an exclusive ``flock`` on ``.fine-tune.lock``,
which records the holder's pid, host and start time).

**Fault injection** (for tests): ``BAICHUAN_FINETUNE_FAULT="<point>:<action>[:<step>][,...]"`` makes
`fault` act when the saving code reaches ``<point>`` (only in the save of global step ``<step>``
when given). Checkpoint points, in order: ``before_save`` (old marker removed, nothing written),
``after_weights`` (model weights written), ``after_optimizer`` (optimizer/scheduler written),
``before_marker`` (every file written), ``after_marker`` (complete, nothing rotated), ``mid_rotate``
(an old checkpoint set aside, not yet deleted). Final-output points: ``final_before_save``,
``final_after_weights``, ``final_before_move`` (temporary directory complete), ``final_mid_move``
(some files moved, ``config.json``/``adapter_config.json`` not). Actions: ``kill`` (SIGKILL this
process), ``enospc`` (raise ``OSError(ENOSPC)`` as a full disk would), ``pause`` or ``pause=S`` (sleep
S seconds, default 3600). Unset in normal runs; reading it costs one environment lookup per point.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from transformers import GenerationConfig

from . import checkpoint_trust
from ..options.arguments import UsageError
from ..model.configuration_baichuan import chat_generation_config
from .weight_files import weights_file_problem
from ..core.errors import RunFault

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

# The self-contained model code (specs_baichuan: the facts the other three import relatively).
MODEL_CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py", "specs_baichuan.py")
# What config.json needs so that AutoConfig/AutoModelForCausalLM find MODEL_CODE_FILES.
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
}
DEFAULT_MODEL_MAX_LENGTH = 4096  # BaichuanConfig's default, for a config.json without the field


# ----- runtime faults -----


class RunError(RuntimeError, RunFault):
    """A runtime fault of the run (not of its flags or data): printed as one line, exit code 1."""


class DiskFullError(RunError):
    """No space (or quota) left while writing a checkpoint or the final output."""


class OutputDirInUse(RunError):
    """Another run holds ``output_dir``'s lock."""


FAULT_ENV = "BAICHUAN_FINETUNE_FAULT"
CHECKPOINT_FAULT_POINTS = ("before_save", "after_weights", "after_optimizer", "before_marker", "after_marker",
                           "mid_rotate")
FINAL_FAULT_POINTS = ("final_before_save", "final_after_weights", "final_before_move", "final_mid_move")


def fault(point: str, step: int | None = None, path: str | os.PathLike | None = None) -> None:
    """Act as ``$BAICHUAN_FINETUNE_FAULT`` says at `point` of a save (see the module docstring).

    `path` is what is being written there (named in an injected ENOSPC error).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3) or parts[0] != point:
            continue
        if len(parts) == 3 and (step is None or parts[2] != str(step)):
            continue
        action = parts[1]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path or point))
        elif action.startswith("pause"):
            time.sleep(float(action.partition("=")[2] or 3600))
        else:
            raise ValueError(f"${FAULT_ENV}: unknown action {action!r} (kill, enospc, pause[=S])")


# ----- disk full -----

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How libraries report it without an errno: safetensors' SafetensorError, torch's PytorchStreamWriter.
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded")
_WRITE_FAILED_TEXTS = ("file write failed", "unexpected pos")


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the filesystem holding `path` or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException, path: str | os.PathLike, needed: int | None = None) -> bool:
    """Whether `exc` (raised while writing under `path`) means the disk or quota is full.

    torch's stream writer says only "file write failed": that counts when less than `needed` bytes
    (or under 1 MiB) are free.
    """
    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXTS):
            return True
        if any(t in text for t in _WRITE_FAILED_TEXTS):
            with contextlib.suppress(OSError):
                if free_bytes(path) < max(needed or 0, 1 << 20):
                    return True
    return False


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def disk_full_error(what: str, path: str | os.PathLike, needed: int | None, basis: str,
                    previous: Path | None) -> DiskFullError:
    """The one-line error for a full disk while writing `what` to `path`."""
    try:
        free = format_bytes(free_bytes(path))
    except OSError:
        free = "unknown"
    need = f"about {format_bytes(needed)} ({basis})" if needed else "unknown"
    if previous is not None:
        tail = f"the last complete checkpoint {previous} is intact: free space and resume with --resume_from_checkpoint True"
    else:
        tail = "no complete checkpoint: free space (or choose another --output_dir) and start again"
    return DiskFullError(f"no space left on the device while writing {what} to {path}: needs {need}, "
                         f"{free} free; {tail}")


# ----- checkpoints -----


def checkpoint_path(output_dir: str | os.PathLike, global_step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{global_step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-N`` directory in `output_dir`, complete or not, by increasing N."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints whose completion marker exists, by increasing step."""
    return [p for p in list_checkpoints(output_dir) if is_complete_checkpoint(p)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step whose completion marker exists (HF's get_last_checkpoint
    would also take one whose writing was interrupted)."""
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def _fsync_path(path: Path) -> None:
    """fsync a directory (or a file) by path, ignoring file systems that refuse it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _set_aside_and_delete(path: Path, fault_point: str | None = None, step: int | None = None) -> None:
    """Delete a directory so that no reader ever sees it half-deleted under its own name: rename it to a
    hidden name in the same directory (atomic), then delete that."""
    hidden = path.parent / f".deleting-{path.name}-{os.getpid()}"
    os.replace(path, hidden)
    _fsync_path(path.parent)
    if fault_point:
        fault(fault_point, step, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_leftovers(output_dir: str | os.PathLike) -> None:
    """Delete what a killed run may have left half-done: directories set aside for deletion and the
    final output's temporary directory. Main process, under the output directory's lock."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".deleting-") or p.name == FINAL_TMP):
            shutil.rmtree(p, ignore_errors=True)


def begin_checkpoint(path: str | os.PathLike, global_step: int | None = None) -> None:
    """Make way for writing checkpoint `path`: a checkpoint of the same step from an earlier run (an
    explicit resume from an older one rewrites it) loses its marker first, then is deleted, so that a
    kill during the rewrite never leaves new and old files under a "complete" marker. Main process."""
    path = Path(path)
    if path.exists():
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        _fsync_path(path)
        _set_aside_and_delete(path)


def checkpoint_files(path: str | os.PathLike) -> dict[str, int]:
    """Every file under checkpoint `path` but its marker, by relative path (``/``-separated), with its size."""
    root = Path(path)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != COMPLETE_MARKER and not rel.startswith(f".{COMPLETE_MARKER}"):
            files[rel] = p.stat().st_size
    return files


def mark_checkpoint_complete(path: str | os.PathLike, global_step: int) -> None:
    """Write the completion marker last, atomically (temporary file, fsync, rename), listing every file of
    the checkpoint with its size and sha256; the files are fsynced first so that the marker never
    outlives them. Main process, after every process has written its files."""
    path = Path(path)
    files = checkpoint_files(path)
    for rel in files:
        with contextlib.suppress(OSError):
            fd = os.open(path / rel, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    digests = checkpoint_trust.sha256_many([path / rel for rel in files])
    listed = {rel: {"size": size, "sha256": digest} for (rel, size), digest in zip(files.items(), digests)}
    tmp = path / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"global_step": global_step, "time": time.time(), "total_bytes": sum(files.values()),
                   "files": listed}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)
    _fsync_path(path)


def checkpoint_bytes(path: str | os.PathLike) -> int | None:
    """The total size a checkpoint's marker records (None without one)."""
    try:
        return int(json.loads((Path(path) / COMPLETE_MARKER).read_text())["total_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _marker_files(info) -> dict[str, tuple[int, str]] | None:
    """The marker's file list as {relative path: (size, sha256)}, None when it has none in that form."""
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, dict):
        return None
    out = {}
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            return None
        out[rel] = (entry["size"], entry["sha256"])
    return out


def validate_checkpoint(path: str | os.PathLike) -> str | None:
    """What is wrong with checkpoint `path` (None when it looks loadable): its marker must list every file
    with the size and sha256 it has (no file missing, changed or added since), ``trainer_state.json``
    parses, every safetensors header and torch zip directory is readable, and every torch pickle a
    resume loads holds only tensors and allowed values (`checkpoint_trust`)."""
    path = Path(path)
    if not path.is_dir():
        return "no such checkpoint directory"
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"incomplete checkpoint (no {COMPLETE_MARKER}; its writing was interrupted)"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"{COMPLETE_MARKER} is unreadable"
    recorded = _marker_files(info)
    if recorded is None:  # written by an older version, or by hand: nothing to check the files against
        return f"{COMPLETE_MARKER} lists no files with their size and sha256, so its files cannot be verified"
    present = checkpoint_files(path)
    for rel, (size, _) in recorded.items():
        if rel not in present:
            return f"{rel} is missing"
        if present[rel] != size:
            return f"{rel} has {present[rel]} bytes, {size} when the checkpoint was completed"
    extra = sorted(set(present) - set(recorded))
    if extra:
        return f"{extra[0]} was added after the checkpoint was completed"
    rels = sorted(recorded)
    for rel, digest in zip(rels, checkpoint_trust.sha256_many([path / rel for rel in rels])):
        if digest != recorded[rel][1]:
            return f"{rel} was changed after the checkpoint was completed (its sha256 differs)"
    state = path / "trainer_state.json"
    try:
        parsed = json.loads(state.read_text(encoding="utf-8"))
        if not isinstance(parsed, dict) or not isinstance(parsed.get("global_step"), int):
            return "trainer_state.json has no global_step"
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            continue
        problem = weights_file_problem(f)
        if problem:
            return f"{f.relative_to(path).as_posix()}: {problem}"
    # Last, as it reads the most: a matching marker proves nothing against whoever could write both.
    for f in checkpoint_trust.pickle_files(path):
        problem = checkpoint_trust.unsafe_pickle_problem(f)
        if problem:
            return f"{f.relative_to(path).as_posix()}: {problem}"
    return None


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None,
                       keep: Iterable[str | os.PathLike | None] = (), step: int | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond `save_total_limit`; return the deleted ones.

    Called after a new checkpoint is complete. Never deletes the newest complete checkpoint nor those
    in `keep` (the one just written, the best one); interrupted (incomplete) ones go first. Each is
    set aside (renamed) before deletion, so none is ever seen half-deleted. `step`: of the save that
    rotates (for the ``mid_rotate`` fault point). Main process.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    complete = [p for p in checkpoints if is_complete_checkpoint(p)]
    protected = {Path(k).resolve() for k in keep if k}
    if complete:
        protected.add(complete[-1].resolve())
    candidates = [p for p in checkpoints if p not in complete] + complete
    candidates = [p for p in candidates if p.resolve() not in protected]
    excess = len(checkpoints) - max(save_total_limit, len(checkpoints) - len(candidates))
    removed = []
    for path in candidates[:max(excess, 0)]:
        logger.info("Deleting older checkpoint %s (--save_total_limit %d)", path, save_total_limit)
        _set_aside_and_delete(path, "mid_rotate", step)
        removed.append(path)
    return removed


# ----- one writer per output directory -----

LOCK_FILE = ".fine-tune.lock"


class OutputDirLock:
    """An exclusive lock on an output directory for a run's lifetime: ``flock`` on `LOCK_FILE` in it,
    which records the holder (pid, host, start time). The kernel releases it when the process dies,
    however it dies; `release` also deletes the file."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        """Take the lock, or raise `OutputDirInUse` naming the holder (OSError when the directory or the
        lock file cannot be created)."""
        if not self.output_dir.exists():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputDirInUse(
                    f"--output_dir {self.output_dir} is in use by another run ({holder}; lock file {self.path}): "
                    "wait for it to finish or choose another --output_dir") from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder deletes the file when it releases: the inode locked may no longer be
            # the one at self.path, and then a third run could lock a new file. Retry on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        # The holder writes its details right after locking: give it a moment.
        for _ in range(20):
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"null")
                return f"pid {info['pid']} on {info['host']}, started {info['started']}"
            except (ValueError, TypeError, KeyError):
                time.sleep(0.05)
        return "holder unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        # Delete while still holding the lock (see acquire), then unlock by closing.
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        if self._created_dir:  # a run that failed before writing anything leaves no trace
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()

    def __enter__(self) -> "OutputDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(output_dir: str | os.PathLike, is_global_main: bool) -> OutputDirLock:
    """The output directory's lock, taken by the global main process; its outcome is broadcast so that
    every process raises the same error (none waits for a run that never starts). A collective when
    torch.distributed is initialized."""
    lock = OutputDirLock(output_dir)
    error: tuple[str, str] | None = None
    if is_global_main:
        try:
            lock.acquire()
        except OutputDirInUse as e:
            error = ("in_use", str(e))
        except OSError as e:
            error = ("usage", f"--output_dir {output_dir}: cannot create {LOCK_FILE} there: "
                              f"{e.strerror or e}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        lock.release()
        raise (OutputDirInUse if error[0] == "in_use" else UsageError)(error[1]) from None
    return lock


# ----- final output directory -----


def is_zero3(trainer) -> bool:
    engine = getattr(trainer, "deepspeed", None)
    if engine is None:
        return False
    return engine.zero_optimization_stage() == 3


def trained_lora_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters, gathered from every ZeRO-3 shard, on CPU, by state-dict name.

    Called on every process: gathering is a collective.
    """
    model = trainer.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if is_zero3(trainer):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    with gather:
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_lora_adapter(trainer, output_dir: str) -> dict[str, torch.Tensor]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` holding exactly the trained weights.

    Verifies the file against the gathered weights (non-empty, equal) and returns the saved tensors.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = trainer.model
    trained = trained_lora_state_dict(trainer)
    expected = get_peft_model_state_dict(model, state_dict=trained)
    if trainer.args.should_save:
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=trained, safe_serialization=True)
        saved = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
        problems = []
        if not saved:
            problems.append("no tensor saved")
        if set(saved) != set(expected):
            problems.append(f"saved keys differ from the trained ones: {sorted(set(saved) ^ set(expected))[:4]}")
        for name, tensor in saved.items():
            if tensor.numel() == 0:
                problems.append(f"{name} is empty")
            elif name in expected and not torch.equal(tensor, expected[name].to(tensor.dtype)):
                problems.append(f"{name} differs from the trained weights")
        if problems:
            raise RuntimeError(f"LoRA adapter saved to {output_dir} is wrong: " + "; ".join(problems[:5]))
    return expected


def output_generation_config(base_dir: str | os.PathLike, model_max_length: int | None = None) -> GenerationConfig:
    """The base model's generation config when it is a chat one, else the official chat config.

    The official one gets ``max_new_tokens = min(2048, model_max_length // 2)``; `model_max_length`
    defaults to the base config's.
    """
    try:
        config = GenerationConfig.from_pretrained(base_dir)
        if getattr(config, "user_token_id", None) is not None:
            return config
    except (OSError, ValueError):
        pass
    if model_max_length is None:
        model_max_length = _read_json(Path(base_dir) / "config.json").get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
    return chat_generation_config(max_new_tokens=min(2048, model_max_length // 2))


def copy_model_code(output_dir: str | os.PathLike) -> None:
    """Copy the self-contained config/model/tokenizer modules into `output_dir` (for ``trust_remote_code``)."""
    here = Path(__file__).resolve().parents[1] / "model"  # the self-contained model files
    for name in MODEL_CODE_FILES:
        shutil.copyfile(here / name, Path(output_dir) / name)


def finish_output_dir(output_dir: str | os.PathLike, tokenizer, generation_config: GenerationConfig,
                      model_max_length: int, is_adapter: bool) -> None:
    """Make a directory holding saved weights load anywhere: add the tokenizer, `generation_config`
    and the model code, and (for a full model) ``auto_map`` in ``config.json``.

    `model_max_length` goes to ``tokenizer_config.json`` and, for a full model, ``config.json``, so
    that both say the same. A training run passes the larger of the base config's and the training
    length. Main process only, after the weights are written.
    """
    out = Path(output_dir)
    tokenizer.save_pretrained(out)
    _update_json(out / "tokenizer_config.json", model_max_length=model_max_length)
    generation_config.save_pretrained(out)
    copy_model_code(out)
    if not is_adapter:
        config = _read_json(out / "config.json")
        auto_map = {**AUTO_MAP, **(config.get("auto_map") or {})}
        _update_json(out / "config.json", auto_map=auto_map, model_max_length=model_max_length)
    # Never left in a final directory: the weights there are already consolidated.
    (out / "zero_to_fp32.py").unlink(missing_ok=True)


FINAL_TMP = ".final-output.tmp"


def loader_file(is_adapter: bool) -> str:
    """The file whose presence makes a final directory loadable: written last."""
    return "adapter_config.json" if is_adapter else "config.json"


def parameter_bytes(model, trainable_only: bool = False) -> int:
    """Bytes of `model`'s (trainable) parameters in their dtype, ZeRO-3 partitioned ones at full size."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        total += (getattr(p, "ds_numel", None) or p.numel()) * p.element_size()
    return total


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            _fsync_path(f)


def _move_into_place(tmp: Path, out: Path, loader: str, step: int | None) -> None:
    """Move every file of `tmp` into `out`, `loader` last; until then `out` has no `loader` (an earlier
    final output's is removed first), so it never looks like a model with a mix of old and new files."""
    if not (tmp / loader).is_file():
        raise RuntimeError(f"{tmp}: no {loader} was written; the final output is incomplete")
    _fsync_tree(tmp)
    (out / loader).unlink(missing_ok=True)
    _fsync_path(out)
    names = sorted(p.name for p in tmp.iterdir() if p.name != loader)
    for i, name in enumerate(names):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
        if i == 0:
            fault("final_mid_move", step, target)
    os.replace(tmp / loader, out / loader)
    _fsync_path(out)
    tmp.rmdir()


def save_final_output(output_dir: str | os.PathLike, write_weights: Callable[[Path], None],
                      finish: Callable[[Path], None], *, is_main: bool, is_adapter: bool,
                      needed: int | None = None, step: int | None = None) -> None:
    """Write the final output directory as a transaction: `write_weights(tmp)` (every process: gathering
    ZeRO-3 shards is a collective) and `finish(tmp)` (main process: `finish_output_dir`) fill a
    temporary directory inside `output_dir`, whose files then move into place with ``config.json`` /
    ``adapter_config.json`` last. On any failure the temporary directory is removed; a full disk
    becomes one `DiskFullError` naming the path, `needed` bytes and the free ones."""
    out = Path(output_dir)
    tmp = out / FINAL_TMP
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            fault("final_before_save", step, tmp)
        write_weights(tmp)
        if is_main:
            fault("final_after_weights", step, tmp)
            finish(tmp)
            fault("final_before_move", step, tmp)
            _move_into_place(tmp, out, loader_file(is_adapter), step)
    except BaseException as e:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e, out, needed):
            raise disk_full_error("the final output", out, needed, "the weights to save",
                                  last_complete_checkpoint(out)) from None
        raise


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _update_json(path: Path, **values) -> None:
    """Set `values` in the JSON object in `path`; rewritten (sorted, as transformers writes configs)
    only when something changes."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if all(key in data and data[key] == value for key, value in values.items()):
        return
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def remove_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete every ``checkpoint-N`` directory in `output_dir`; return the deleted paths."""
    removed = list_checkpoints(output_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
