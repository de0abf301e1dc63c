"""Answer held-out prompts with one or more models, score them (BLEU-4, ROUGE-1/2/L, exact match) and
write a side-by-side report.

    baichuan-finetune predict --model output/lora --data data/test.json --output_dir output/predict
    baichuan-finetune predict --model models/base --model output/lora --model output/lora/checkpoint-500 \\
        --data data/test.json --output_dir output/compare --greedy
    baichuan-finetune predict ... --num_gpus 2        (two processes, each answering half the prompts)
    python scripts/predict.py ...                     (the same)

--data: a conversation file in any training format (the last assistant turn is the reference, the turns
before it the context), JSONL/JSON of {"prompt", "reference"?, "system"?}, or a .txt of one prompt per
line. Writes OUTPUT_DIR/<model>/predictions.jsonl and metrics.json, and OUTPUT_DIR/report.md and
report.html (docs/predict.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core.errors import exit_code
from ..data.records import DataError
from ..tools.loading import ToolArgumentParser, one_line
from ..tools.predict import add_predict_arguments, check_inputs, predict, settings_from
from .config import parse_with_config


def build_parser(prog: str | None = None) -> ToolArgumentParser:
    parser = ToolArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)
    settings = settings_from(args)
    try:  # flags, every model directory, the output directory and the prompts before any model loads
        prompts = check_inputs(args.model, args.data, args.output_dir, settings, args.num_gpus)
    except DataError as e:
        parser.fail(str(e), exit_code(e))
    except ValueError as e:
        parser.error(str(e))
    try:
        predict(args.model, prompts, args.output_dir, settings, args.num_gpus)
    except Exception as e:  # loading a model that passed its checks, or generating
        parser.fail(f"predict failed: {one_line(e)}")
    return 0
