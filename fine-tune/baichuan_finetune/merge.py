"""Merge a LoRA adapter into its base model: a self-contained model directory.

The output loads like any Baichuan2 checkpoint: safetensors shards, ``config.json`` with
``auto_map`` (so ``trust_remote_code=True`` works without this package), the tokenizer, the chat
generation config and our self-contained model code; it is finished exactly as a full fine-tune's
output directory is (``saving.finish_output_dir``).
"""

from __future__ import annotations

from pathlib import Path

from .loading import adapter_base_dir, load_model, model_kind
from .saving import finish_output_dir


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
    finish_output_dir(output_dir, tokenizer, generation_config, merged.config.model_max_length, is_adapter=False)
    return output_dir
