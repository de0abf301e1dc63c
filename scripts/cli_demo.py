"""Chat in the terminal with a base model, a full fine-tune or a LoRA adapter directory.

    python scripts/cli_demo.py --model output/lora

Type 'clear' for a new conversation, 'stream' to toggle streaming, 'exit' to quit; end a line
with '\\' to continue it or bracket a pasted block with lines of '\"\"\"'; Ctrl+C stops a reply.
"""

import argparse

from baichuan_finetune.inference import add_generation_arguments, load_model, make_generation_config, run_terminal_chat


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory: base, full fine-tune or LoRA adapter")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="e.g. cuda (default: where it loads)")
    parser.add_argument("--quantize", type=int, choices=[8, 4], default=None, help="bitsandbytes 8/4-bit (GPU)")
    parser.add_argument("--no_stream", action="store_true", help="print each reply when it is complete")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, quantization_bits=args.quantize)
    config = make_generation_config(model, args.max_new_tokens, args.temperature, args.top_p, args.greedy)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    run_terminal_chat(model, tokenizer, config, stream=not args.no_stream)


if __name__ == "__main__":
    main()
