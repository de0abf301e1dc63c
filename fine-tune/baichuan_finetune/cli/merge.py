"""Merge a LoRA adapter into its base model and write a self-contained model directory.

    baichuan-finetune merge output/lora output/merged
    python scripts/merge_lora.py output/lora output/merged            (the same)

Everything is checked before a model is loaded (one line, exit 2): the adapter and its files, its
base model, the output directory (new or empty; --overwrite replaces it), --max_shard_size, and that the base is the one the
adapter was trained on (its recorded base_model_fingerprint.json; --force merges anyway).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core.errors import exit_code
from ..tools.loading import DTYPES, ToolArgumentParser, one_line
from ..tools.merge import MergeError, merge_lora
from .config import parse_with_config


def build_parser(prog: str | None = None) -> ToolArgumentParser:
    parser = ToolArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="LoRA adapter directory (with adapter_config.json)")
    parser.add_argument("output_dir", help="new directory for the merged model")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="dtype of the saved weights (auto: as the base model is stored)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--force", action="store_true",
                        help="merge even if the base differs from the one the adapter records")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output_dir (only once the new merge is completely written)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)

    def warn(message: str) -> None:
        print(f"{parser.prog}: warning: {message}", file=sys.stderr, flush=True)

    try:
        out = merge_lora(args.adapter_dir, args.output_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         force=args.force, warn=warn, overwrite=args.overwrite)
    except MergeError as e:  # refused before loading anything
        parser.fail(str(e), exit_code(e))
    except Exception as e:  # while loading or writing (a full disk, say); SafetensorError is none of the usual
        parser.fail(f"merging {args.adapter_dir} failed: {one_line(e)}")
    files = sorted(p.name for p in out.iterdir())
    print(f"merged {args.adapter_dir} into {out}: {', '.join(files)}")
    return 0
