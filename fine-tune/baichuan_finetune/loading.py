"""Load any model directory the toolkit reads or writes, for the tools (chat, server, evaluation, merge).

Three kinds of directory, told apart by their files:

- a base model or a full fine-tune: ``config.json`` + weights, loaded by ``AutoModelForCausalLM``
  (our native classes, registered by importing this package);
- a LoRA adapter: ``adapter_config.json`` present, loaded by ``peft.AutoPeftModelForCausalLM`` on
  top of the base named in ``base_model_name_or_path``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import baichuan_finetune  # noqa: F401  (registers our Auto classes)

from .configuration_baichuan import chat_generation_config

ADAPTER_CONFIG = "adapter_config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILE = "tokenizer.model"
# The one list of --dtype choices of every tool; "auto" keeps the dtype the weights are stored in.
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATION_BITS = (8, 4)


def model_kind(model_dir: str | Path) -> str:
    """``"lora"`` for a PEFT adapter directory, ``"model"`` for a base model or full fine-tune."""
    model_dir = Path(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        return "lora"
    if (model_dir / "config.json").is_file():
        return "model"
    raise FileNotFoundError(f"{model_dir}: neither {ADAPTER_CONFIG} (LoRA adapter) nor config.json (model) found")


def adapter_base_dir(adapter_dir: str | Path) -> str:
    """``base_model_name_or_path`` of a LoRA adapter directory."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} has no base_model_name_or_path")
    return base


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """The ``dtype`` argument for ``from_pretrained``: a ``DTYPES`` name, a torch dtype, or None for "auto"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved with ``model_dir``; for an adapter without one, its base model's."""
    model_dir = Path(model_dir)
    source = model_dir
    if model_kind(model_dir) == "lora" and not (model_dir / TOKENIZER_FILE).is_file():
        source = adapter_base_dir(model_dir)
    return AutoTokenizer.from_pretrained(str(source))


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    quantization_bits: int | None = None,
):
    """Model (a ``PeftModel`` for an adapter directory) and tokenizer, in eval mode.

    ``quantization_bits`` (8 or 4) quantizes the linear layers with bitsandbytes after loading
    (LoRA adapters are merged first: quantized weights cannot take a LoRA delta).
    """
    model_dir = Path(model_dir)
    kind = model_kind(model_dir)
    dtype = resolve_dtype(dtype)
    if kind == "lora":
        from peft import AutoPeftModelForCausalLM
        from peft.auto import get_default_import_allowlist

        # An adapter saved without task_type names its base class by module: allow ours.
        allowlist = [*get_default_import_allowlist(), "baichuan_finetune"]
        model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, import_allowlist=allowlist)
        has_own = (model_dir / GENERATION_CONFIG).is_file()
        generation_source = model_dir if has_own else Path(adapter_base_dir(model_dir))
        model.get_base_model().generation_config = _load_generation_config(generation_source)
        if quantization_bits:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.generation_config = _load_generation_config(model_dir)
    if device:
        model.to(device)
    if quantization_bits:
        from .quantize import quantize

        model = quantize(model, quantization_bits)
    model.eval()
    return model, load_tokenizer(model_dir)


def _load_generation_config(model_dir: Path) -> GenerationConfig:
    """The saved generation config, or the official chat one where the directory has none."""
    if (Path(model_dir) / GENERATION_CONFIG).is_file():
        return GenerationConfig.from_pretrained(str(model_dir))
    return chat_generation_config()


def chat_model(model):
    """The model whose ``chat()``/``generate()`` to call: for a ``PeftModel`` its base model.

    PEFT injects the LoRA layers into the base model's modules in place, so the base model's
    forward (hence ``chat``) runs with the adapter active.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every tool that loads a model shares: ``--model``, ``--dtype``, ``--device``, ``--quantize``.

    Their values go to ``load_model(args.model, dtype=args.dtype, device=args.device,
    quantization_bits=args.quantize)``.
    """
    parser.add_argument("--model", required=True, help="model directory: base, full fine-tune or LoRA adapter")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="weights dtype (auto: as the checkpoint is stored)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:0, cpu (default: where it loads)")
    parser.add_argument("--quantize", type=int, choices=QUANTIZATION_BITS, default=None,
                        help="bitsandbytes 8/4-bit (GPU)")
