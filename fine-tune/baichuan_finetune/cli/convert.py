"""Normalise lm_head.weight offline (the official "migrate to Baichuan 1" conversion).

    baichuan-finetune convert SRC_MODEL_DIR DST_MODEL_DIR
    python scripts/convert_lm_head.py SRC_MODEL_DIR DST_MODEL_DIR            (the same)
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..tools.convert import convert_lm_head
from ..core.errors import exit_code
from .config import parse_with_config


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="model directory to convert")
    parser.add_argument("dst", help="new directory for the converted model")
    parser.add_argument("--max_shard_size", default="5GB")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)
    try:
        out = convert_lm_head(args.src, args.dst, args.max_shard_size)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return exit_code(err)
    print(f"wrote {out} with a normalised lm_head.weight")
    return 0
