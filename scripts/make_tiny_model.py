"""Build the embedded tiny Baichuan2 model directory (see baichuan_finetune.tiny)."""

import argparse

from baichuan_finetune.tiny import DEFAULT_DATA_DIR, make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--position_embedding", choices=["rope", "alibi"], default="rope")
    parser.add_argument("--tokenizer_model", default=None, help="a sentencepiece .model to use instead of training one")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="text to train the tokenizer on")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--intermediate_size", type=int, default=344)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_tiny_model(**vars(args))
    print(f"tiny Baichuan2 ({args.position_embedding}) written to {out}")


if __name__ == "__main__":
    main()
