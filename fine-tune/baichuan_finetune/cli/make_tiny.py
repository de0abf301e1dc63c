"""Build the embedded tiny Baichuan2 model directory (see baichuan_finetune.builder.tiny): a few layers and a
tokenizer trained on the package's own example data, for the quickstart, tests and smoke runs.

    baichuan-finetune make-tiny --output_dir models/tiny-baichuan2
    python scripts/make_tiny_model.py --output_dir models/tiny-baichuan2            (the same)
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..builder.tiny import make_tiny_model
from .config import parse_with_config

DEFAULT_OUTPUT_DIR = "tiny-baichuan2"


def build_parser(prog: str | None = None, output_required: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if output_required:
        parser.add_argument("--output_dir", required=True)
    else:
        parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help=f"default: ./{DEFAULT_OUTPUT_DIR}")
    parser.add_argument("--position_embedding", choices=["rope", "alibi"], default="rope")
    parser.add_argument("--tokenizer_model", default=None, help="a sentencepiece .model to use instead of training one")
    parser.add_argument("--data_dir", default=None,
                        help="JSON/JSONL text to train the tokenizer on (default: the shipped tokenizer, trained on "
                             "the repository's data/quickstart.json and data/examples)")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--intermediate_size", type=int, default=344)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None, output_required: bool = True) -> int:
    parser = build_parser(prog, output_required)
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)
    out = make_tiny_model(**vars(args))
    print(f"tiny Baichuan2 ({args.position_embedding}) written to {out}")
    return 0
