"""Browser chat with streaming and history, for a base model, a full fine-tune or a LoRA adapter.

The page is served by the OpenAI-compatible server (``GET /``) and streams from its
``/v1/chat/completions``: no web framework beyond FastAPI/uvicorn is needed.

    baichuan-finetune web --model output/lora --port 8501
    python scripts/web_demo.py --model output/lora --port 8501            (the same)
    # then open http://127.0.0.1:8501/
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
    parser.set_defaults(port=8501)
    serve(parse_with_config(parser, sys.argv[1:] if argv is None else argv), banner="Web demo (open in a browser)",
          parser=parser)
    return 0
