"""Quantization: bitsandbytes 8-bit or 4-bit (NF4) layers, made when a model is loaded, never stored.

There is no quantized checkpoint format to write: the official Baichuan2 release quantizes online, and
so do we. Use it through these flags (bitsandbytes: the optional extra, requirements-quant.txt):

    baichuan-finetune chat  --model output/merged --quantize 8 --device cuda     (4 for NF4)
    baichuan-finetune serve --model output/merged --quantize 4 --device cuda
    baichuan-finetune eval  --model output/merged --quantize 8 --task_dir ...
    baichuan-finetune train examples/qlora-7b.yaml       (QLoRA: --use_lora True --q_lora True, CUDA only)

In Python: ``model.quantize(8)`` (baichuan_finetune.objectives.quantize.quantize). This command says whether
quantization can run here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .config import parse_with_config


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parse_with_config(parser, sys.argv[1:] if argv is None else argv)
    from ..objectives.quantize import bitsandbytes_available

    if not bitsandbytes_available():
        print("bitsandbytes: not installed; pip install -r requirements-quant.txt (or pip install bitsandbytes) "
              "for --quantize 8|4 and QLoRA")
        return 0
    import torch

    cuda = torch.cuda.is_available()
    print("bitsandbytes: installed; --quantize 8|4 works here"
          + ("; QLoRA training (--q_lora True) too" if cuda else " on CPU; QLoRA training needs a CUDA GPU"))
    print("usage: see `baichuan-finetune quantize --help`")
    return 0
