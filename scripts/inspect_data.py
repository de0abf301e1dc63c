"""Statistics and a readable preview of training data as the model will see it.

    python scripts/inspect_data.py --data_path data/quickstart.json --tokenizer_path ../shared/baichuan2 \
        --model_max_length 4096 [--batch_size 8] [--preview 3] [--dump out.jsonl]
    python scripts/inspect_data.py --stage dpo --data_path data/preference_example.json ...   (preference pairs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fine-tune"))

from baichuan_finetune.arguments import DataArguments, UsageError  # noqa: E402
from baichuan_finetune.data_preview import inspect_data, inspect_pairs, load_sentencepiece  # noqa: E402
from baichuan_finetune.records import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", required=True, help="file, comma-separated files or directory")
    parser.add_argument("--tokenizer_path", required=True, help="directory with tokenizer.model, or the .model file")
    parser.add_argument("--model_max_length", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=8, help="batch size for the 'longest' padding efficiency")
    parser.add_argument("--preview", type=int, default=3, help="number of examples to show")
    parser.add_argument("--dump", help="write kept examples (input_ids, labels) as JSON lines here")
    parser.add_argument("--on_bad_record", choices=["error", "skip"], default="error")
    parser.add_argument("--truncation", choices=["head", "rounds"], default="head")
    parser.add_argument("--data_cache_dir", default=None)
    parser.add_argument("--stage", choices=["sft", "dpo"], default="sft",
                        help="dpo: preview preference pairs (prompt, chosen, rejected; scored spans marked)")
    args = parser.parse_args(argv)
    try:
        if args.model_max_length < 2:
            raise UsageError(f"--model_max_length {args.model_max_length}: must be at least 2")
        data_args = DataArguments(data_path=args.data_path, on_bad_record=args.on_bad_record,
                                  truncation=args.truncation, data_cache_dir=args.data_cache_dir)
        sp = load_sentencepiece(args.tokenizer_path)
        if args.stage == "dpo":
            if args.dump:
                raise UsageError("--dump: not available with --stage dpo")
            print(inspect_pairs(data_args, sp, args.model_max_length, preview=args.preview, color=sys.stdout.isatty()))
            return 0
        print(inspect_data(data_args, sp, args.model_max_length, batch_size=args.batch_size, preview=args.preview,
                           dump=args.dump, color=sys.stdout.isatty()))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
