"""Offline checkpoint conversions.

``convert_lm_head``: the official "migrate to Baichuan 1" step. Baichuan2 normalises the rows of
``lm_head.weight`` at run time (NormHead); Baichuan-1 tooling uses a plain linear head. Writing the
normalised weight lets that tooling run the model unchanged. Our NormHead gives the same logits on
the converted checkpoint, since normalising a normalised row changes nothing.
"""

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

WEIGHT_SUFFIXES = (".bin", ".safetensors")
INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: from its index if sharded, else the single file."""
    for index_name in INDEX_FILES:
        index = model_dir / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / name for name in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors, pytorch_model.bin or shard index found")


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
    for file in weight_files(src):
        state.update(load_weights(file))
    if "lm_head.weight" not in state:
        raise KeyError(f"{src}: no lm_head.weight in the checkpoint")
    head = state["lm_head.weight"]
    state["lm_head.weight"] = torch.nn.functional.normalize(head.float(), dim=-1).to(head.dtype)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in INDEX_FILES:
            shutil.copy2(item, dst / item.name)
    save_torch_state_dict(state, dst, max_shard_size=max_shard_size, safe_serialization=True)
    return dst
