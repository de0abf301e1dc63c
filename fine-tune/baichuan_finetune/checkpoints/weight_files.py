"""Which files hold a directory's weights, and whether each one is whole (no tensor is read).

One owner for transformers' order of preference (``model.safetensors``, its sharded index, then
``pytorch_model.bin`` and its index) and for the structural check of a weights file. Training's
preflight, resume's checkpoint validation, the tools' loading, the base fingerprint and the
``lm_head`` conversion all go through here, so a truncated, empty or random file fails in one line
naming it, before any loader sees it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

from ..core.errors import DataFault
from ..core.json_files import JSONObjectError, read_json_object

MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
INDEX_SUFFIX = ".index.json"
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit


class WeightFilesError(ValueError, DataFault):
    """Weights a directory cannot load; the message is one line naming the file."""


def weights_entry(directory: Path, names: Sequence[str] = MODEL_WEIGHT_FILES, what: str = "model") -> Path:
    """The first of `names` present in `directory`: the weights file, or shard index, a loader reads."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise WeightFilesError(f"{directory}: no {what} weights ({', '.join(names)})")


def index_weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a shard index; every shard must be a file beside it."""
    try:
        weight_map = read_json_object(index).get("weight_map")
    except JSONObjectError:
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFilesError(f"{index}: not a weight index (expected a JSON object with a \"weight_map\")")
    for shard in sorted({str(s) for s in weight_map.values()}):
        if "/" in shard or shard.startswith(".") or not (index.parent / shard).is_file():
            raise WeightFilesError(f"{index}: names shard {shard!r}, which is not in {index.parent}")
    return {str(k): str(v) for k, v in weight_map.items()}


def weight_files(directory: Path, names: Sequence[str] = MODEL_WEIGHT_FILES, what: str = "model") -> list[Path]:
    """The weights files a loader reads from `directory`: the shards of its index, or the single file."""
    entry = weights_entry(directory, names, what)
    if entry.name.endswith(INDEX_SUFFIX):
        return [directory / shard for shard in sorted(set(index_weight_map(entry).values()))]
    return [entry]


def check_weights(directory: Path, names: Sequence[str] = MODEL_WEIGHT_FILES, what: str = "model") -> list[Path]:
    """`weight_files`, each one structurally whole; else `WeightFilesError` naming the first bad one."""
    files = weight_files(directory, names, what)
    for f in files:
        problem = weights_file_problem(f)
        if problem:
            raise WeightFilesError(f"{f}: {problem}")
    return files


def weights_file_problem(path: str | os.PathLike) -> str | None:
    """What is structurally wrong with one weights file, None when nothing is.

    ``*.safetensors``: the header parses and its tensors end exactly at the end of the file. Anything
    else is taken as a ``torch.save`` file: a zip archive whose central directory (at its end) is intact.
    """
    path = Path(path)
    try:
        return _safetensors_problem(path) if path.suffix == ".safetensors" else _torch_zip_problem(path)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"


def _safetensors_problem(path: Path) -> str | None:
    bad = "not a complete safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{bad} ({size} bytes)"
        header_len = int.from_bytes(head, "little")
        if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
            return f"{bad} (header of {header_len} bytes in a file of {size})"
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError):
            return f"{bad} (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{bad} (its header is not a JSON object)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{bad} (tensor {name!r} has no data_offsets)"
        end = max(end, offsets[1])
    data = size - 8 - header_len
    if end != data:
        return f"{bad} (truncated: its tensors need {end} bytes of data, the file holds {data})"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return "not a complete torch checkpoint (an empty zip archive)"
    except zipfile.BadZipFile as e:
        return f"not a complete torch checkpoint (zip archive: {e})"
    return None
