"""Loading a checkpoint never runs code from it.

A ``torch.save`` file is a pickle: loaded with ``weights_only=False`` it can call any function it
names. Whoever can write a checkpoint directory (shared storage, a downloaded run) could then run code
on every rank of a resume, and our completion marker does not stop them (they can rewrite it too).
So every torch file of a checkpoint is loaded with ``weights_only=True``, allowing only plain
containers, tensors and the few exact types listed in `checkpoint_globals`:

- the HF Trainer already loads ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``
  and adapter/model ``.bin`` files with ``weights_only=True`` (transformers 5.24, peft 0.21); it never
  loads ``training_args.bin``;
- DeepSpeed's ``TorchCheckpointEngine`` loads ``global_step*/*model_states.pt`` and
  ``*optim_states.pt`` with ``weights_only=False``: `install_safe_checkpoint_engine` gives the engine
  `SafeTorchCheckpointEngine`, whose ``load`` is the safe one;
- `unsafe_pickle_problem` loads each file the same way before the resume starts (``mmap``: the tensors
  are mapped, not read), so a crafted file is refused in one line naming it, before anything is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Torch files that nothing ever loads on resume (HF writes the TrainingArguments pickle for reference
# only): not scanned, but hashed by the completion marker like every other file.
NEVER_LOADED = ("training_args.bin",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _deepspeed_globals() -> list:
    """The exact non-tensor types DeepSpeed 0.19 pickles into its states, found by listing
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` over real ZeRO-2 and ZeRO-3 checkpoints
    (full and LoRA): the ZeRO stage enum and the loss scaler in ``*optim_states.pt``, the fragment
    addresses of ZeRO-1/2's ``*optim_states.pt``. ``DynamicLossScaler`` is what fp16 runs store in place
    of ``LossScaler``. Plain instances of these classes carry numbers only and define no ``__reduce__``."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed: its checkpoints cannot be resumed anyway
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _numpy_globals() -> list:
    # What the HF Trainer's own allow-list (trainer_pt_utils.safe_globals) admits for rng_state*.pth.
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@functools.cache
def checkpoint_globals() -> tuple:
    """The one allow-list for every torch load of a checkpoint (ours, DeepSpeed's through the engine).
    Built on first use: importing DeepSpeed takes seconds and prints, which tools must not pay for."""
    return tuple(_numpy_globals() + _deepspeed_globals())


def safe_load(path: str | os.PathLike, map_location=None, mmap: bool = False):
    """``torch.load`` of one checkpoint file with ``weights_only=True`` and `checkpoint_globals` allowed;
    raises ``pickle.UnpicklingError`` for anything else a pickle asks for."""
    with torch.serialization.safe_globals(list(checkpoint_globals())):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def unsafe_pickle_problem(path: str | os.PathLike) -> str | None:
    """Why torch file `path` may not be loaded (it asks for something beyond tensors and the allowed
    types, or is no torch file), None when it loads safely."""
    try:
        safe_load(path, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on to suggest allow-listing the global: not advice for a checkpoint's reader.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        asks = f" (it asks for {found.group(1)})" if found else ""
        return (f"holds pickled objects that are not plain tensors or values{asks}; refusing to load it, "
                "as that could run code")
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        return f"not a loadable torch file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def pickle_files(root: str | os.PathLike) -> list[Path]:
    """The torch pickle files under `root` that a resume loads, by path."""
    root = Path(root)
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in TORCH_SUFFIXES
            and p.name not in NEVER_LOADED]


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_many(paths: list[Path]) -> list[str]:
    """`file_sha256` of each path, several at once (hashlib releases the GIL; checkpoints hold large files)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(file_sha256, paths))


@functools.cache
def safe_checkpoint_engine_class() -> type:
    """`SafeTorchCheckpointEngine`: DeepSpeed's torch checkpoint engine whose ``load`` never runs code.
    Built on first use, so that importing this module needs no DeepSpeed."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    def load(self, path: str, map_location=None):
        logger.info("Loading %s (weights_only=True)", path)
        return safe_load(path, map_location=map_location)

    return type("SafeTorchCheckpointEngine", (TorchCheckpointEngine,), {"load": load, "__module__": __name__})


def install_safe_checkpoint_engine(engine) -> None:
    """Make DeepSpeed `engine` load checkpoints through `SafeTorchCheckpointEngine`.

    DeepSpeed offers no option for a safe load, so the engine's ``checkpoint_engine`` attribute (which
    every model-state and ZeRO-state load goes through) is replaced by an instance of the safe subclass
    with the same settings. Only DeepSpeed's default ``TorchCheckpointEngine`` passes
    ``weights_only=False``; the decoupled and fast writers a config may choose call ``torch.load``
    without it, which torch >= 2.6 makes ``weights_only=True``, so they are left as they are.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        return
    safe = safe_checkpoint_engine_class().__new__(safe_checkpoint_engine_class())
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe
