"""Chat in the terminal with a base model, a full fine-tune or a LoRA adapter directory.

    baichuan-finetune chat --model output/lora
    baichuan-finetune chat --model output/lora --system "You are a helpful assistant."
    python scripts/cli_demo.py --model output/lora            (the same)

Type 'clear' for a new conversation, 'stream' to toggle streaming, 'exit' to quit; end a line
with '\\' to continue it or bracket a pasted block with lines of '\"\"\"'; Ctrl+C stops a reply.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..tools.chat_cli import run_terminal_chat
from ..tools.generation import add_generation_arguments, check_generation_arguments, make_generation_config
from ..tools.loading import ToolArgumentParser, add_model_arguments, check_model_dir, load_model_or_exit
from .config import parse_with_config


def build_parser(prog: str | None = None) -> ToolArgumentParser:
    parser = ToolArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--no_stream", action="store_true", help="print each reply when it is complete")
    parser.add_argument("--system", default="", metavar="TEXT",
                        help="system prompt of every conversation (as a training record's 'system' field)")
    add_generation_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)
    try:  # every flag and the model directory before loading anything: one line, exit 2
        check_generation_arguments(args)
        check_model_dir(args.model)
    except ValueError as e:
        parser.error(str(e))
    model, tokenizer = load_model_or_exit(parser, args.model, dtype=args.dtype, device=args.device,
                                          quantization_bits=args.quantize)
    config = make_generation_config(model, args.max_new_tokens, args.temperature, args.top_p, args.greedy)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    run_terminal_chat(model, tokenizer, config, stream=not args.no_stream, system=args.system)
    return 0
