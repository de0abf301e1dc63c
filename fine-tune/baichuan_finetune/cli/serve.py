"""OpenAI-compatible chat API for a base model, a full fine-tune or a LoRA adapter directory.

    baichuan-finetune serve --model output/lora --port 8000
    python scripts/openai_api.py --model output/lora --port 8000            (the same)
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "你好"}], "stream": true}'
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..tools.serve import build_arg_parser, serve
from .config import parse_with_config


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_arg_parser(__doc__)
    if prog:
        parser.prog = prog
    serve(parse_with_config(parser, sys.argv[1:] if argv is None else argv), banner="OpenAI-compatible API",
          parser=parser)
    return 0
