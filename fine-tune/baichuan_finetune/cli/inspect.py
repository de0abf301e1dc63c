"""Statistics and a readable preview of training data as the model will see it.

    baichuan-finetune inspect --data_path data/quickstart.json --tokenizer_path ../shared/baichuan2 \\
        --model_max_length 4096 [--batch_size 8] [--preview 3] [--dump out.jsonl]
    baichuan-finetune inspect --stage dpo --data_path data/preference_example.json ...   (preference pairs)
    python scripts/inspect_data.py ...            (the same)
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..options.arguments import CHOICES, DataArguments, UsageError, check_model_max_length
from ..data.data_preview import inspect_data, inspect_pairs, load_sentencepiece
from ..core.errors import ToolkitError, exit_code
from .config import parse_with_config


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="file, comma-separated files or directory")
    parser.add_argument("--tokenizer_path", required=True, help="directory with tokenizer.model, or the .model file")
    parser.add_argument("--model_max_length", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=8, help="batch size for the 'longest' padding efficiency")
    parser.add_argument("--preview", type=int, default=3, help="number of examples to show")
    parser.add_argument("--dump", help="write kept examples (input_ids, labels) as JSON lines here")
    parser.add_argument("--on_bad_record", choices=CHOICES["on_bad_record"], default="error")
    parser.add_argument("--truncation", choices=CHOICES["truncation"], default="head")
    parser.add_argument("--data_cache_dir", default=None)
    parser.add_argument("--stage", choices=CHOICES["stage"], default="sft",
                        help="dpo: preview preference pairs (prompt, chosen, rejected; scored spans marked); "
                             "pt: raw-text documents packed into rows (docs/pretraining.md)")
    parser.add_argument("--mix_strategy", choices=CHOICES["mix_strategy"], default="concat",
                        help="how the sources of --data_path (a.jsonl:0.7,b.json:0.3) are mixed")
    parser.add_argument("--mix_seed", type=int, default=None, help="seed of the interleaving (default: 42)")
    parser.add_argument("--packing", action="store_true", help="pack SFT examples into rows (as --packing True)")
    parser.add_argument("--text_field", default="text", help="--stage pt: JSON field / table column of the text")
    parser.add_argument("--txt_split", choices=CHOICES["txt_split"], default="line",
                        help="--stage pt, .txt files: one document per line or blank-line separated")
    parser.add_argument("--pt_cross_document", action="store_true",
                        help="--stage pt: concatenate-and-chunk rows (attention across documents)")
    parser.add_argument("--streaming", action="store_true",
                        help="estimate from the first 1000 records of each source, as a --streaming run reports "
                             "(nothing else is read)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    try:
        args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)
        check_model_max_length(args.model_max_length)  # what training accepts
        data_args = DataArguments(data_path=args.data_path, on_bad_record=args.on_bad_record,
                                  truncation=args.truncation, data_cache_dir=args.data_cache_dir,
                                  mix_strategy=args.mix_strategy, mix_seed=args.mix_seed, packing=args.packing,
                                  text_field=args.text_field, txt_split=args.txt_split,
                                  pt_cross_document=args.pt_cross_document)
        sp = load_sentencepiece(args.tokenizer_path)
        if args.streaming:
            from ..data.streaming import StreamConfig, estimate_report

            if args.stage == "dpo":
                raise UsageError("--streaming: not with --stage dpo (training reads preference pairs whole)")

            config = StreamConfig.from_options(data_args, stage=args.stage, seed=42, batch_size=args.batch_size,
                                               model_max_length=args.model_max_length)
            print(estimate_report(config, sp).format())
            return 0
        if args.stage == "dpo":
            if args.dump:
                raise UsageError("--dump: not available with --stage dpo")
            print(inspect_pairs(data_args, sp, args.model_max_length, preview=args.preview, color=sys.stdout.isatty()))
            return 0
        print(inspect_data(data_args, sp, args.model_max_length, batch_size=args.batch_size, preview=args.preview,
                           dump=args.dump, color=sys.stdout.isatty(), stage=args.stage))
    except ToolkitError as e:  # UsageError (2), DataError (1)
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)
    return 0
