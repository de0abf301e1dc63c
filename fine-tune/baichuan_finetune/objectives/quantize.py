"""bitsandbytes quantization: online 8/4-bit (as in the official release) and the QLoRA load config.

- ``quantize(model, 8 | 4)``: the model's own ``BaichuanForCausalLM.quantize`` (self-contained, so
  it also works for directories loaded with ``trust_remote_code``), reached through a ``PeftModel``;
  it replaces the layers' ``modeling_baichuan.LINEAR_LAYER_NAMES``.
- ``from_pretrained(dir, quantization_config=quantization_config_for_qlora())``: 4-bit NF4 at load
  time, for QLoRA training (``--use_lora True --q_lora True``).
- ``check_qlora_available()``: one clear line when bitsandbytes or a CUDA GPU is missing.

bitsandbytes is an optional extra (``requirements-quant.txt``); nothing imports it at module load.
"""

from __future__ import annotations

import importlib.util

import torch


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed (checked without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def quantize(model, bits: int, compute_dtype: torch.dtype | None = None):
    """Quantize the layers' linear weights of ``model`` (or a ``PeftModel``'s base) in place; return it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "quantize"):
        raise TypeError(f"{type(base).__name__} has no quantize(bits); load it with baichuan_finetune imported")
    base.quantize(bits, compute_dtype=compute_dtype)
    return model


def quantization_config_for_qlora(compute_dtype: torch.dtype = torch.bfloat16):
    """``BitsAndBytesConfig`` for QLoRA: NF4 weights, double quantization, ``compute_dtype`` matmuls.

    The output head (``NormHead``, not an ``nn.Linear``) and the embeddings stay unquantized.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["lm_head"],
    )


def check_qlora_available() -> None:
    """Raise ``RuntimeError`` with one line saying what QLoRA is missing here, else return."""
    if not bitsandbytes_available():
        raise RuntimeError("QLoRA (--q_lora True) needs bitsandbytes: pip install -r requirements-quant.txt")
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA (--q_lora True) needs a CUDA GPU: bitsandbytes 4-bit training does not run on CPU")
