"""Offline checkpoint conversions.

``convert_lm_head``: the official "migrate to Baichuan 1" step. Baichuan2 normalises the rows of
``lm_head.weight`` at run time (NormHead); Baichuan-1 tooling uses a plain linear head. Writing the
normalised weight lets that tooling run the model unchanged. Our NormHead gives the same logits on
the converted checkpoint, since normalising a normalised row changes nothing.
"""

import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from ..checkpoints.weight_files import INDEX_SUFFIX, check_weights

WEIGHT_SUFFIXES = (".bin", ".safetensors")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file (safetensors or a PyTorch ``.bin``), on the CPU."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # Never unpickle arbitrary objects from a checkpoint.
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_lm_head(src: str | Path, dst: str | Path, max_shard_size: str = "5GB") -> Path:
    """Copy checkpoint ``src`` to ``dst`` (safetensors) with ``lm_head.weight`` rows normalised."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError("convert_lm_head writes a new directory; DST must differ from SRC")
    state: dict[str, torch.Tensor] = {}
    for file in check_weights(src):  # whole files only, in the order transformers prefers
        state.update(load_weights(file))
    if "lm_head.weight" not in state:
        raise KeyError(f"{src}: no lm_head.weight in the checkpoint")
    head = state["lm_head.weight"]
    state["lm_head.weight"] = torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and not item.name.endswith(INDEX_SUFFIX):
            shutil.copy2(item, dst / item.name)
    save_torch_state_dict(state, dst, max_shard_size=max_shard_size, safe_serialization=True)
    return dst
