"""Merge a LoRA adapter into its base model and write a self-contained model directory.

    python scripts/merge_lora.py output/lora output/merged
"""

import argparse

from baichuan_finetune.loading import DTYPES
from baichuan_finetune.merge import merge_lora


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="LoRA adapter directory (with adapter_config.json)")
    parser.add_argument("output_dir", help="new directory for the merged model")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="dtype of the saved weights (auto: as the base model is stored)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default 2GB)")
    args = parser.parse_args(argv)
    out = merge_lora(args.adapter_dir, args.output_dir, dtype=args.dtype, max_shard_size=args.max_shard_size)
    files = sorted(p.name for p in out.iterdir())
    print(f"merged {args.adapter_dir} into {out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
