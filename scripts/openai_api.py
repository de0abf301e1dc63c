"""OpenAI-compatible chat API for a base model, a full fine-tune or a LoRA adapter directory.

    python scripts/openai_api.py --model output/lora --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "你好"}], "stream": true}'
"""

from baichuan_finetune.serve import build_arg_parser, exit_now, serve


def main(argv=None) -> None:
    parser = build_arg_parser(__doc__)
    serve(parser.parse_args(argv), banner="OpenAI-compatible API", parser=parser)


if __name__ == "__main__":
    main()
    exit_now()
