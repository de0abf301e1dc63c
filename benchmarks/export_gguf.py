"""GGUF export: file size and seconds per --quant type, for a model with the real vocabulary.

    python benchmarks/export_gguf.py [--hidden_size 512] [--layers 32] [--quants f16,q8_0,q4_k_m] [--json PATH]

The model is a random Baichuan2 of the given shape (RoPE, 32 layers: llama.cpp's baichuan graph) with the
real 125,696-piece tokenizer (``../shared/baichuan2``, else the copy under tests/fixtures), written as
safetensors first; each export then runs ``tools.export.export_gguf`` in this process, as
``baichuan-finetune export`` does (f16 written by the gguf library; q8_0 and q4_k_m through llama.cpp's
quantizer from a temporary f16 file). Seconds include reading the weights; the size is the file's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from baichuan_finetune.builder.tiny import make_tiny_model
from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM
from baichuan_finetune.tools.export import export_gguf

import common

FIXTURE_TOKENIZER = common.REPO_ROOT / "tests" / "fixtures" / "baichuan2" / "tokenizer.model"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--intermediate_size", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    common.add_json_argument(parser)
    args = parser.parse_args()
    report = common.Report(args)
    tokenizer = common.TOKENIZER if common.TOKENIZER.is_file() else FIXTURE_TOKENIZER
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", tokenizer_model=tokenizer, hidden_size=args.hidden_size,
                                    intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads)
        params = sum(p.numel() for p in BaichuanForCausalLM.from_pretrained(str(model_dir)).parameters())
        for quant in args.quants.split(","):
            start = time.perf_counter()
            result = export_gguf(model_dir, Path(tmp) / f"model-{quant}.gguf", quant=quant, modelfile=False)
            seconds = time.perf_counter() - start
            rows.append([quant, result.architecture, round(result.size / 1e6, 1), round(8 * result.size / params, 2),
                         round(seconds, 1)])
            results[quant] = {"bytes": result.size, "seconds": seconds}
            (Path(tmp) / f"model-{quant}.gguf").unlink()
    report.line(f"model: {params / 1e6:.0f}M parameters (hidden {args.hidden_size}, {args.layers} layers, "
                f"vocabulary 125,696), tokenizer {tokenizer}")
    report.table(["quant", "architecture", "MB", "bits/parameter", "seconds"], rows, title="GGUF export")
    report.finish(results=results, parameters=params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
