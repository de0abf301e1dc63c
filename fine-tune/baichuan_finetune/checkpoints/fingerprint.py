"""The fingerprint of a base model that a LoRA adapter records, so a merge can tell it got the right base.

An adapter's ``base_model_name_or_path`` is only a path: the directory there may since hold another
model of the same shapes (a different fine-tune, the ALiBi 13B layout in place of the RoPE 7B one),
and PEFT merges into it silently. At save time training writes ``base_model_fingerprint.json`` into
the adapter directory (`write_fingerprint`): the base's architecture (model type, position scheme,
sizes, vocabulary) and a weight fingerprint of ``model.embed_tokens.weight`` and ``lm_head.weight``.
``scripts/merge_lora.py`` recomputes it for the base it merges into and refuses a mismatch
(`differences`) unless ``--force``.

The weight fingerprint is read from the base directory's files, never from a live model, so ZeRO-3
partitioning or LoRA wrapping does not matter: float64 statistics (sum, sum of magnitudes, a
position-weighted sum) of the first `ROWS` rows of each tensor, read lazily (safetensors
``get_slice``; ``torch.load(mmap=True, weights_only=True)`` for ``.bin``). Statistics, not a hash:
the same base stored in another dtype (bf16 -> fp32) must still match, within `RELATIVE_TOLERANCE`
of the magnitudes' sum; a different base of the same shapes misses by orders of magnitude more.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..core.json_files import JSONObjectError, read_json_object
from ..model.specs_baichuan import position_embedding_of
from .weight_files import INDEX_SUFFIX, WeightFilesError, index_weight_map, weights_entry
from ..core.errors import UsageFault

logger = logging.getLogger("baichuan_finetune")

FINGERPRINT_FILE = "base_model_fingerprint.json"
VERSION = 1
ARCHITECTURE_FIELDS = ("model_type", "position_embedding", "vocab_size", "hidden_size", "intermediate_size",
                       "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
WEIGHT_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
ROWS = 16
RELATIVE_TOLERANCE = 1e-3


class FingerprintError(ValueError, UsageFault):
    """A base whose fingerprint cannot be computed, or a fingerprint file that cannot be read."""


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except JSONObjectError as e:
        raise FingerprintError(f"{path}: unreadable ({e.reason})" if e.cause else str(e)) from None


def architecture(config: dict) -> dict:
    """The fields of ``config.json`` that decide whether weights fit, position scheme resolved.

    Baichuan's official configs have no ``position_embedding``: RoPE when ``max_position_embeddings``
    is given (7B), ALiBi otherwise (13B), as ``BaichuanConfig`` resolves it.
    """
    out = {name: config.get(name) for name in ARCHITECTURE_FIELDS}
    if out["position_embedding"] is None and config.get("model_type") == "baichuan":
        out["position_embedding"] = position_embedding_of(config)
    return out


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """The file holding each of `WEIGHT_NAMES` (absent names are left out)."""
    try:
        entry = weights_entry(model_dir)
        weight_map = index_weight_map(entry) if entry.name.endswith(INDEX_SUFFIX) else None
    except WeightFilesError as e:
        raise FingerprintError(str(e)) from None
    if weight_map is None:
        return {n: entry for n in WEIGHT_NAMES}
    return {n: model_dir / weight_map[n] for n in WEIGHT_NAMES if n in weight_map}


def _first_rows(path: Path, names: list[str]) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Shape and first `ROWS` rows (float64) of each of `names` found in one weights file."""
    found = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for name in names:
                    if name in keys:
                        part = f.get_slice(name)
                        found[name] = (list(part.get_shape()), part[:ROWS].to(torch.float64))
        else:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            for name in names:
                if name in state:
                    found[name] = (list(state[name].shape), state[name][:ROWS].to(torch.float64))
    except FingerprintError:
        raise
    except Exception as e:  # truncated or corrupt files raise library-specific errors
        raise FingerprintError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return found


def weight_statistics(rows: torch.Tensor) -> dict[str, float]:
    flat = rows.reshape(-1)
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / max(flat.numel(), 1)
    return {"sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(), "weighted_sum": (flat * position).sum().item()}


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; a hub name through the local cache only (never downloads)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:
        raise FingerprintError(f"{name_or_path}: no such model directory (nor in the local hub cache)")


def compute_fingerprint(base: str | os.PathLike) -> dict:
    """The fingerprint of the base model at `base` (a directory, or a hub name in the local cache)."""
    model_dir = resolve_model_dir(base)
    config = _read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else None
    if config is None:
        raise FingerprintError(f"{model_dir}: no config.json")
    by_file: dict[Path, list[str]] = {}
    for name, path in _weight_files(model_dir).items():
        by_file.setdefault(path, []).append(name)
    weights = {}
    for path, names in by_file.items():
        for name, (shape, rows) in _first_rows(path, names).items():
            weights[name] = {"shape": shape, "rows": rows.shape[0], **weight_statistics(rows)}
    return {"version": VERSION, "base_model": str(base), "architecture": architecture(config), "weights": weights}


def write_fingerprint(base: str | os.PathLike, adapter_dir: str | os.PathLike) -> Path | None:
    """Record `base`'s fingerprint in `adapter_dir`; None (one warning line) when it cannot be computed.

    A missing fingerprint only costs the merge its check, so it never fails a training run.
    """
    try:
        fingerprint = compute_fingerprint(base)
    except FingerprintError as e:
        logger.warning("no %s written (merges will not check their base): %s", FINGERPRINT_FILE, e)
        return None
    path = Path(adapter_dir) / FINGERPRINT_FILE
    tmp = path.with_name(f".{FINGERPRINT_FILE}.tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_fingerprint(adapter_dir: str | os.PathLike) -> dict | None:
    """The fingerprint recorded in `adapter_dir`, or None for an adapter saved without one."""
    path = Path(adapter_dir) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data.get("architecture"), dict) or not isinstance(data.get("weights"), dict):
        raise FingerprintError(f"{path}: not a base model fingerprint (no architecture/weights)")
    return data


def _close(recorded: float, current: float, scale: float) -> bool:
    return abs(recorded - current) <= RELATIVE_TOLERANCE * scale + 1e-12


def differences(recorded: dict, current: dict) -> list[str]:
    """What differs between the recorded base and the current one (empty when they match)."""
    out = []
    for name in ARCHITECTURE_FIELDS:
        was, now = recorded["architecture"].get(name), current["architecture"].get(name)
        if was != now:
            out.append(f"{name} {was} (adapter's base) vs {now} (this base)")
    for name, was in recorded["weights"].items():
        now = current["weights"].get(name)
        if now is None:
            out.append(f"{name} missing in this base")
        elif was.get("shape") != now["shape"]:
            out.append(f"{name} shape {was.get('shape')} vs {now['shape']}")
        else:
            scale = max(abs(was.get("abs_sum", 0.0)), abs(now["abs_sum"]))
            if not all(_close(was.get(k, float("nan")), now[k], scale) for k in ("sum", "abs_sum", "weighted_sum")):
                out.append(f"{name} holds other values (first {now['rows']} rows differ)")
    return out
