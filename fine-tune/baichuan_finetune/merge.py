"""Merge a LoRA adapter into its base model: a self-contained model directory.

The output loads like any Baichuan2 checkpoint: safetensors shards, ``config.json`` with
``auto_map`` (so ``trust_remote_code=True`` works without this package), the tokenizer, the chat
generation config and our self-contained model code.
"""

from __future__ import annotations

import json
from pathlib import Path

import baichuan_finetune  # noqa: F401  (registers our Auto classes)

from .inference import adapter_base_dir, load_model, model_kind
from .tiny import copy_model_code

REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForCausalLM")


def merge_lora(
    adapter_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "auto",
    max_shard_size: str = "2GB",
) -> Path:
    """Write ``base + LoRA`` merged into ``output_dir`` and return it.

    ``dtype`` "auto" keeps the dtype the base weights are stored in.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if model_kind(adapter_dir) != "lora":
        raise ValueError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    if output_dir.resolve() in (adapter_dir.resolve(), Path(adapter_base_dir(adapter_dir)).resolve()):
        raise ValueError(f"{output_dir}: write the merged model to a new directory, not over its inputs")
    peft_model, tokenizer = load_model(adapter_dir, dtype=dtype)
    generation_config = peft_model.get_base_model().generation_config
    merged = peft_model.merge_and_unload()
    merged.generation_config = generation_config
    # peft leaves the base's name; the merged model is its own checkpoint now.
    merged.config.name_or_path = str(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(output_dir)
    copy_model_code(output_dir)
    _check_auto_map(output_dir)
    return output_dir


def _check_auto_map(output_dir: Path) -> None:
    config = json.loads((output_dir / "config.json").read_text(encoding="utf-8"))
    auto_map = config.setdefault("auto_map", {})
    changed = False
    defaults = {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    }
    for key in REQUIRED_AUTO_MAP:
        if key not in auto_map:
            auto_map[key] = defaults[key]
            changed = True
    if changed:
        (output_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
