"""Browser chat with streaming and history, for a base model, a full fine-tune or a LoRA adapter.

The page is served by the OpenAI-compatible server (``GET /``) and streams from its
``/v1/chat/completions``: no web framework beyond FastAPI/uvicorn is needed.

    python scripts/web_demo.py --model output/lora --port 8501
    # then open http://127.0.0.1:8501/
"""

from baichuan_finetune.serve import build_arg_parser, exit_now, serve


def main(argv=None) -> None:
    parser = build_arg_parser(__doc__)
    parser.set_defaults(port=8501)
    serve(parser.parse_args(argv), banner="Web demo (open in a browser)", parser=parser)


if __name__ == "__main__":
    main()
    exit_now()
