"""Export a model, checkpoint or LoRA adapter (merged with its base on the way) for llama.cpp, Ollama, LM Studio.

    baichuan-finetune export --model output/merged --output baichuan2-ft-q4_k_m.gguf --quant q4_k_m
    baichuan-finetune export --model output/lora --output ft-f16.gguf            (adapter + its base)
    python scripts/export.py --model output/merged --output ft-q8_0.gguf --quant q8_0     (the same)
    ollama create baichuan2-ft -f baichuan2-ft-q4_k_m.Modelfile            (written next to the GGUF)

    baichuan-finetune export --model output/merged --format gptq --output out/gptq --calibration_data data/train.json

--format gguf (the default) writes one GGUF file (f32, f16 and bf16 directly, the other --quant types
through llama.cpp's quantizer, llama-cpp-python) and an Ollama Modelfile next to it. --format gptq writes a
4-bit GPTQ directory for vLLM/TGI with gptqmodel (a separate environment: docs/deploy.md says what was verified),
calibrated on conversations of the training data.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core.errors import ToolkitError, exit_code
from ..tools.export import FORMATS, QUANT_TYPES, ExportError, export_gguf, export_gptq, gptq_problem
from ..tools.loading import ToolArgumentParser, one_line
from .config import parse_with_config


def build_parser(prog: str | None = None) -> ToolArgumentParser:
    parser = ToolArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model, checkpoint or LoRA adapter directory")
    parser.add_argument("--output", required=True, help="the .gguf file to write")
    parser.add_argument("--format", default="gguf", choices=FORMATS, help="gguf (llama.cpp, Ollama, LM Studio) or gptq")
    parser.add_argument("--quant", default="f16", metavar="TYPE",
                        help=f"GGUF tensor type: {', '.join(QUANT_TYPES)} (default f16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (and its .Modelfile)")
    parser.add_argument("--no_modelfile", action="store_true", help="do not write the Ollama Modelfile (NAME.Modelfile next to NAME.gguf)")
    gptq = parser.add_argument_group("--format gptq (--output is a new directory)")
    gptq.add_argument("--calibration_data", default=None, help="training data whose conversations calibrate GPTQ")
    gptq.add_argument("--bits", type=int, default=4, help="4 (default) or 8")
    gptq.add_argument("--group_size", type=int, default=128, help="GPTQ group size (divides the hidden sizes)")
    gptq.add_argument("--max_samples", type=int, default=256, help="conversations used for calibration")
    return parser


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)

    def warn(message: str) -> None:
        print(f"{parser.prog}: warning: {message}", file=sys.stderr, flush=True)

    try:
        if args.format == "gptq":
            problem = gptq_problem()
            if problem:
                raise ExportError(problem)
            if not args.calibration_data:
                raise ExportError("--format gptq needs --calibration_data (training data to calibrate on)")
            result = export_gptq(args.model, args.output, args.calibration_data, bits=args.bits,
                                 group_size=args.group_size, max_samples=args.max_samples, overwrite=args.overwrite)
        else:
            result = export_gguf(args.model, args.output, quant=args.quant, overwrite=args.overwrite,
                                 modelfile=not args.no_modelfile, warn=warn)
    except ToolkitError as e:  # ExportError, a DataError of the calibration data, llama.cpp's quantizer failing
        parser.fail(str(e), exit_code(e))
    except Exception as e:  # while reading weights or writing (a full disk): one line, nothing under --output
        parser.fail(f"exporting {args.model} failed: {one_line(e)}")
    for note in result.notes:
        print(f"note: {note}")
    kind = f"{args.bits}-bit" if args.format == "gptq" else args.quant.lower()
    print(f"wrote {result.path} ({result.architecture}, {kind}, {_size(result.size)}) in {result.seconds:.1f} s")
    if result.modelfile is not None:
        print(f"wrote {result.modelfile}: ollama create NAME -f {result.modelfile}")
    return 0
