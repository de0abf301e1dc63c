"""Normalise lm_head.weight offline (the official "migrate to Baichuan 1" conversion).

Usage: python scripts/convert_lm_head.py SRC_MODEL_DIR DST_MODEL_DIR
"""

import argparse
import sys

from baichuan_finetune.convert import convert_lm_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--max_shard_size", default="5GB")
    args = parser.parse_args()
    try:
        out = convert_lm_head(args.src, args.dst, args.max_shard_size)
    except (FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"convert_lm_head: {err}")
    print(f"wrote {out} with a normalised lm_head.weight")


if __name__ == "__main__":
    main()
