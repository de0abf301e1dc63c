"""Merge a LoRA adapter into its base model: a self-contained model directory.

The output loads like any Baichuan2 checkpoint: safetensors shards, ``config.json`` with
``auto_map`` (so ``trust_remote_code=True`` works without this package), the tokenizer, the chat
generation config and our self-contained model code; it is finished exactly as a full fine-tune's
output directory is (``saving.finish_output_dir``).

Everything that can be checked is checked before a model is loaded (`check_merge`): the adapter
directory, its configuration and weights, its base model, the output directory, the shard size, and
that the base is the one the adapter was trained on (``fingerprint``: refused unless ``force``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..checkpoints import fingerprint
from .loading import (ADAPTER_CONFIG, ModelDirError, check_model_dir, creation_problem, load_model,
                      read_adapter_config, resolve_base_dir)
from ..checkpoints.saving import finish_output_dir
from ..core.errors import UsageFault
from ..core.processes import pid_running

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


class MergeError(ValueError, UsageFault):
    """A merge refused before any model is loaded; one line naming the path, flag or difference."""


@dataclass
class MergePlan:
    """What `check_merge` found: the base directory, the shard size in bytes, and warnings to show."""

    base_dir: Path
    max_shard_bytes: int
    warnings: list[str] = field(default_factory=list)


def parse_shard_size(value: str | int) -> int:
    """``"2GB"``, ``"200KB"``, ``"1.5GB"`` or a number of bytes; > 0."""
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise MergeError(f"--max_shard_size {value!r}: expected a size such as 2GB, 500MB, 200KB (or bytes)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper() if m.group(2) else None])
    if size <= 0:
        raise MergeError(f"--max_shard_size {value!r}: must be larger than 0")
    return size


def _check_output_dir(output_dir: Path, adapter_dir: Path, base_dir: Path, overwrite: bool) -> None:
    if output_dir.is_symlink() and not output_dir.exists():
        raise MergeError(f"output_dir {output_dir} is a dangling symbolic link (to {os.readlink(output_dir)}): "
                         "create its target or remove the link")
    if output_dir.resolve() in (adapter_dir.resolve(), base_dir.resolve()):
        raise MergeError(f"{output_dir}: write the merged model to a new directory, not over its inputs")
    if output_dir.exists() and not output_dir.is_dir():
        raise MergeError(f"output_dir {output_dir} is a file: name a new directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        # Old shards next to new ones load as a mix of two models: the directory is replaced whole, if at all.
        raise MergeError(f"output_dir {output_dir} is not empty: name a new (or empty) directory, or pass "
                         "--overwrite to replace it")
    problem = creation_problem(output_dir)
    if problem is not None:
        raise MergeError(f"output_dir {output_dir}: {problem}")


def check_merge(adapter_dir: str | Path, output_dir: str | Path, max_shard_size: str | int = "2GB",
                force: bool = False, overwrite: bool = False) -> MergePlan:
    """Every check of a merge that needs no model loaded; raises `MergeError` (one line)."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    shard_bytes = parse_shard_size(max_shard_size)
    if not adapter_dir.exists():
        raise MergeError(f"adapter_dir {adapter_dir}: no such directory")
    if not adapter_dir.is_dir():
        raise MergeError(f"adapter_dir {adapter_dir}: not a directory")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        what = "a model directory (config.json)" if (adapter_dir / "config.json").is_file() else "a directory"
        raise MergeError(f"{adapter_dir} is {what}, not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = read_adapter_config(adapter_dir)
        base_dir = resolve_base_dir(config["base_model_name_or_path"], adapter_dir)
        check_model_dir(adapter_dir, flag="adapter_dir")  # adapter weights, base config/weights, tokenizer
    except ModelDirError as e:
        raise MergeError(str(e)) from None
    _check_output_dir(output_dir, adapter_dir, base_dir, overwrite)

    plan = MergePlan(base_dir, shard_bytes)
    try:
        recorded = fingerprint.read_fingerprint(adapter_dir)
    except fingerprint.FingerprintError as e:
        raise MergeError(f"{e} (pass --force to merge without checking the base)") from None
    if recorded is None:
        plan.warnings.append(f"{adapter_dir} records no {fingerprint.FINGERPRINT_FILE} (saved by an older version "
                             f"or another tool): cannot check that {base_dir} is the base it was trained on")
        return plan
    try:
        current = fingerprint.compute_fingerprint(base_dir)
    except fingerprint.FingerprintError as e:
        raise MergeError(str(e)) from None
    differences = fingerprint.differences(recorded, current)
    if differences:
        summary = "; ".join(differences)
        if not force:
            raise MergeError(f"{base_dir} is not the base {adapter_dir} was trained on: {summary} "
                             "(pass --force to merge anyway)")
        plan.warnings.append(f"--force: merging into a base that differs from the adapter's: {summary}")
    return plan


def remove_stale_merges(output_dir: str | Path) -> list[str]:
    """Clean up after merges into `output_dir` that were killed (their PID no longer runs here).

    A merge writes ``.NAME.merging-PID`` next to `output_dir` and sets an old `output_dir` aside as
    ``.NAME.replaced-PID`` for the moment of the swap; a SIGKILL or a power cut leaves them behind.
    A stale ``merging`` directory is removed (a merge is reproducible); a stale ``replaced`` one too when
    `output_dir` exists (the swap finished), else it is the only copy of the old output and is kept.
    Returns a warning for each thing done or kept.
    """
    output_dir = Path(output_dir)
    notes = []
    if not output_dir.parent.is_dir():
        return notes
    for kind in ("merging", "replaced"):
        for path in sorted(output_dir.parent.glob(f".{glob.escape(output_dir.name)}.{kind}-*")):
            pid = path.name.rpartition("-")[2]
            if not pid.isdigit() or pid_running(int(pid)):
                continue  # a merge still running (on this machine) owns it
            if kind == "replaced" and not output_dir.exists():
                notes.append(f"{path} is the previous {output_dir}, set aside by a merge that was killed (PID {pid}); "
                             f"kept: move it back to {output_dir.name} or remove it")
                continue
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path}, left by a merge that was killed (PID {pid})")
    return notes


def merge_lora(
    adapter_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "auto",
    max_shard_size: str = "2GB",
    force: bool = False,
    warn: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``base + LoRA`` merged into ``output_dir`` and return it.

    ``dtype`` "auto" keeps the dtype the base weights are stored in. Raises `MergeError` before
    loading anything when `check_merge` refuses; its warnings go to `warn` (default: stderr).
    ``overwrite`` replaces a non-empty ``output_dir`` whole, once the new merge is completely written.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    plan = check_merge(adapter_dir, output_dir, max_shard_size, force=force, overwrite=overwrite)
    for message in plan.warnings + remove_stale_merges(output_dir):
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)))(message)
    peft_model, tokenizer = load_model(adapter_dir, dtype=dtype)
    generation_config = peft_model.get_base_model().generation_config
    merged = peft_model.merge_and_unload()
    merged.generation_config = generation_config
    # peft leaves the base's name; the merged model is its own checkpoint now.
    merged.config.name_or_path = str(output_dir)
    # Written next to output_dir and renamed into place: a merge that fails (a full disk) leaves no
    # half-written directory that looks like a model.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.merging-{os.getpid()}"
    old = output_dir.parent / f".{output_dir.name}.replaced-{os.getpid()}"
    try:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=plan.max_shard_bytes)
        finish_output_dir(tmp, tokenizer, generation_config, merged.config.model_max_length, is_adapter=False)
        if output_dir.is_dir():
            os.replace(output_dir, old)  # empty, or --overwrite: set aside until the new one is in place
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return output_dir
