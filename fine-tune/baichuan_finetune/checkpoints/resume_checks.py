"""What a checkpoint was trained with, and the check that a resume continues that same training.

Every checkpoint holds ``run_record.json`` (written by `BaichuanTrainer` before the completion marker,
so the marker's sha256 covers it): the settings that give the checkpoint its meaning (data files and
their content, batch layout, sequence length, packing, stage, LoRA or not and its shape) and the base
model's fingerprint (`fingerprint.compute_fingerprint`). `check_resume` compares it with the current run
before any data is prepared or model loaded, and refuses a difference in one line naming the setting and
both values (`UsageError`, exit 2). Settings in `arguments.RESUME_IGNORABLE` may be accepted with
``--resume_ignore_mismatch NAME[,NAME]``; the others (another stage, LoRA rank or targets, QLoRA, a
full checkpoint resumed as LoRA or the reverse, a base of another architecture) describe tensors of
other shapes or meanings, and could only end in a traceback or a silently different run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import fingerprint
from ..options.arguments import RESUME_IGNORABLE, Arguments, UsageError
from ..data.mixing import data_files

RUN_RECORD = "run_record.json"
VERSION = 1


def _data_files(spec: str | None, stage: str = "sft") -> list[str]:
    """The files of a data path, absolute, each with its source's ``:weight`` when the mix has weights."""
    if not spec:
        return []
    return [os.path.abspath(p) + ("" if w is None else f":{w:g}") for p, w in data_files(spec, stage)]


# A streamed corpus can be terabytes that the run reads once, lazily: hashing it whole at every launch (on
# every rank) would cost more than the training step it guards. Its files are identified by size and their
# first and last MiB instead; a cached data set is read whole to be tokenized anyway, so it is hashed whole.
SAMPLED_BYTES = 1 << 20


def file_digest(path: str | os.PathLike, sampled: bool = False) -> bytes:
    """sha256 of a file's content, or with `sampled` of its size, first and last `SAMPLED_BYTES`."""
    with open(path, "rb") as f:
        if not sampled:
            return hashlib.file_digest(f, "sha256").digest()
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256(str(size).encode())
        h.update(f.read(SAMPLED_BYTES))
        if size > SAMPLED_BYTES:
            f.seek(max(SAMPLED_BYTES, size - SAMPLED_BYTES))
            h.update(f.read(SAMPLED_BYTES))
        return h.digest()


def data_content(args: Arguments) -> str:
    """sha256 over the contents of the training and evaluation files, in order (not names or dates); with
    ``--streaming`` the training files count by size, head and tail (`file_digest`)."""
    h = hashlib.sha256()
    for name, spec in (("train", args.data.data_path), ("eval", args.data.eval_data_path)):
        sampled = name == "train" and args.data.streaming
        for path, _ in data_files(spec, args.training.stage) if spec else []:
            h.update(name.encode() + file_digest(path, sampled))
    return h.hexdigest()


def run_record(args: Arguments, base_model: str) -> dict[str, Any]:
    """The record of this run that every checkpoint carries (see the module docstring)."""
    t, d, lora = args.training, args.data, args.lora
    settings = {
        "stage": t.stage,
        # A streamed run's checkpoints hold a stream position, a cached run's a sampler position: never swapped
        # (checked before data_content, which streaming computes otherwise).
        "streaming": True if d.streaming else None,
        "use_lora": lora.use_lora,
        "q_lora": lora.q_lora,
        "lora_r": lora.lora_r if lora.use_lora else None,
        "lora_target_modules": _targets(lora) if lora.use_lora else None,
        "lora_alpha": lora.lora_alpha if lora.use_lora else None,
        "data_path": ",".join(_data_files(d.data_path, t.stage)),
        "eval_data_path": ",".join(_data_files(d.eval_data_path, t.stage)) or None,
        "data_content": data_content(args),
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "world_size": t.world_size,
        "model_max_length": t.model_max_length,
        "packing": d.packing,
        # None for one source read whole and for SFT/DPO (older records lack these keys: None there too).
        "mix_strategy": f"{d.mix_strategy} seed {t.seed if d.mix_seed is None else d.mix_seed}"
        if d.mix_strategy != "concat" else None,
        "pt_rows": ("cross_document" if d.pt_cross_document else "per_document") if t.stage == "pt" else None,
    }
    try:
        base = fingerprint.compute_fingerprint(base_model)
    except fingerprint.FingerprintError:
        base = None  # a base we cannot fingerprint is not checked (merge_lora.py does the same)
    return {"version": VERSION, "settings": settings, "base_model": base}


def _targets(lora) -> str:
    targets = lora.target_modules
    return targets if isinstance(targets, str) else ",".join(sorted(targets))


def write_run_record(checkpoint: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write `record` into `checkpoint` (main process, before the completion marker)."""
    path = Path(checkpoint) / RUN_RECORD
    tmp = path.with_name(f".{RUN_RECORD}.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _shown(value: Any) -> str:
    return "(none)" if value is None or value == "" else str(value)


def check_resume(checkpoint: str | os.PathLike, current: dict[str, Any], ignore: str = "") -> list[str]:
    """Raise `UsageError` (one line) when `current` (`run_record` of this run) differs from what
    `checkpoint` was trained with in a setting not named in `ignore` (``--resume_ignore_mismatch``).
    Returns the differences that were ignored, one line each, for the log."""
    where = f"--resume_from_checkpoint {checkpoint}"
    path = Path(checkpoint) / RUN_RECORD
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        settings = recorded["settings"]
        if not isinstance(settings, dict):
            raise TypeError
    except FileNotFoundError:
        raise UsageError(f"{where}: no {RUN_RECORD} (written by an older version), so this run cannot be "
                         "checked against it; start a new run") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{where}: {RUN_RECORD} is unreadable") from None
    ignored_names = {n.strip() for n in (ignore or "").split(",") if n.strip()}
    ignored = []
    for name, now in current["settings"].items():
        was = settings.get(name)
        if was == now:
            continue
        line = f"--{name} was {_shown(was)} when {Path(checkpoint).name} was written, now {_shown(now)}"
        if name == "data_content":
            line = (f"the content of the data files (sha256 {str(was)[:12]}) changed since "
                    f"{Path(checkpoint).name} was written (now {str(now)[:12]})")
        if name in ignored_names:
            ignored.append(line)
            continue
        if name in RESUME_IGNORABLE:
            hint = f"resume with the same setting, or pass --resume_ignore_mismatch {name} to continue anyway"
        else:
            hint = "this changes what the checkpoint's tensors are: resume with the same setting or start a new run"
        raise UsageError(f"{where}: {line}; {hint}")
    was_base, now_base = recorded.get("base_model"), current.get("base_model")
    if isinstance(was_base, dict) and isinstance(now_base, dict):
        line = _base_difference(was_base, now_base)
        if line is not None:
            line = (f"--model_name_or_path was {was_base.get('base_model')} when {Path(checkpoint).name} was "
                    f"written, now {now_base.get('base_model')}: {line}")
            if line.endswith("architecture)"):
                raise UsageError(f"{where}: {line}; resume with the base model it was trained from")
            if "base_model" not in ignored_names:
                raise UsageError(f"{where}: {line}; resume with the same base, or pass "
                                 "--resume_ignore_mismatch base_model to continue anyway")
            ignored.append(line)
    return ignored


def _base_difference(was: dict, now: dict) -> str | None:
    """How two base-model fingerprints differ (None when they match): an architecture field first."""
    was_arch, now_arch = was.get("architecture") or {}, now.get("architecture") or {}
    for name in fingerprint.ARCHITECTURE_FIELDS:
        if was_arch.get(name) != now_arch.get(name):
            return f"{name} {_shown(was_arch.get(name))} vs {_shown(now_arch.get(name))} (another architecture)"
    problems = fingerprint.differences(was, now)
    return f"another model of the same shapes ({problems[0]})" if problems else None
