"""k-shot multiple-choice evaluation (C-Eval / CMMLU / MMLU CSV layouts) of any model directory.

    baichuan-finetune eval --model output/lora --task_dir ../shared/data/cmmlu_subset --shots 5
    python scripts/evaluate.py ...            (the same)

Each file's layout is detected: C-Eval CSV (id,question,A,B,C,D,answer), CMMLU CSV, MMLU CSV
(question,choice0..choice3,answer index; or the headerless original), MMLU/HF JSON or JSONL (question,
choices, answer index or letter). Prints a table of per-subject and average accuracy; --output_json
writes lm-evaluation-harness's results shape, --log_samples the per-question predictions next to it.

    baichuan-finetune eval --model output/pt --perplexity held_out.txt [--max_length 4096] [--stride 2048]

--perplexity scores raw text instead (the files `train --stage pt` reads: .txt, JSON/JSONL with a text
field, Parquet/Arrow): token-weighted perplexity over its documents (evaluation/perplexity.py), printed
and, with --output_json, written as {perplexity, nll, tokens, documents, ...}.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core.errors import ToolkitError, exit_code
from ..tools.evaluate import EvalDataError, check_arguments, run
from ..tools.loading import ToolArgumentParser, add_model_arguments, one_line
from .config import parse_with_config


def build_parser(prog: str | None = None) -> ToolArgumentParser:
    parser = ToolArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--task_dir", default=None, help="folder with dev/ and val/ or test/ CSV files")
    parser.add_argument("--perplexity", default=None, metavar="FILE",
                        help="instead of --task_dir: perplexity on raw-text documents (a file or directory)")
    parser.add_argument("--text_field", default="text", help="--perplexity: JSON field / table column of the text")
    parser.add_argument("--txt_split", default="line", choices=["line", "blank"],
                        help="--perplexity, .txt: one document per line, or blank-line separated")
    parser.add_argument("--max_length", type=int, default=None,
                        help="--perplexity: window length (default: the model's model_max_length)")
    parser.add_argument("--stride", type=int, default=None,
                        help="--perplexity: sliding windows every N tokens (default: chunked, N = --max_length)")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev/ (default 5)")
    parser.add_argument("--split", default=None, help="questions folder (default: val if present, else test)")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions per subject")
    parser.add_argument("--columns", default=None,
                        help="column mapping, e.g. question=Question,A=A,B=B,C=C,D=D,answer=Answer "
                             "(case-insensitive names, or 0-based positions)")
    parser.add_argument("--answer_format", default=None, choices=["letter", "index"],
                        help="answers as A-D (letter) or 0-3 (index); default: detected from the layout")
    parser.add_argument("--no_header", action="store_true", help="CSV files have no header row (original MMLU)")
    parser.add_argument("--prompt_style", default=None, choices=["zh", "en"],
                        help="zh: C-Eval/CMMLU prompt (题目/答案：); en: MMLU prompt (Answer:); "
                             "default: zh for C-Eval/CMMLU layouts, en for MMLU ones")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_json", default=None,
                        help="write the results here, in lm-evaluation-harness's shape")
    parser.add_argument("--log_samples", action="store_true",
                        help="also write samples_<task>.jsonl (per-question prediction) next to --output_json")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)
    if (args.perplexity is None) == (args.task_dir is None):
        parser.error("give --task_dir (multiple choice) or --perplexity FILE (raw text), one of them")
    if args.perplexity is not None:
        return _perplexity(parser, args)
    try:  # flags, paths and every question file before the model loads
        check_arguments(args)
    except EvalDataError as e:
        parser.fail(str(e), exit_code(e))
    except ValueError as e:
        parser.error(str(e))
    try:
        run(args)
    except EvalDataError as e:
        parser.fail(str(e), exit_code(e))
    except Exception as e:  # loading the model, or a letter that is not one token in its vocabulary
        parser.fail(f"evaluating {args.model} failed: {one_line(e)}")
    return 0


def _perplexity(parser: ToolArgumentParser, args) -> int:
    """``--perplexity``: documents read and encoded before the model loads (bad input: one line)."""
    import json
    from pathlib import Path

    from ..evaluation.perplexity import format_result, perplexity, read_documents
    from ..tools.loading import check_model_dir, load_model_or_exit, load_tokenizer

    for flag, value in (("--max_length", args.max_length), ("--stride", args.stride),
                        ("--batch_size", args.batch_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: expected a number >= 1")
    if args.stride is not None and args.max_length is not None and args.stride > args.max_length:
        parser.error(f"--stride {args.stride}: at most --max_length {args.max_length}")
    try:
        check_model_dir(args.model)
    except ToolkitError as e:
        parser.fail(str(e), exit_code(e))
    try:
        documents, empty = read_documents(args.perplexity, load_tokenizer(args.model), args.text_field,
                                          args.txt_split)
    except ToolkitError as e:
        parser.fail(str(e), exit_code(e))
    if not documents:
        parser.fail(f"{args.perplexity}: no document to score ({empty} empty)")
    model, _ = load_model_or_exit(parser, args.model, dtype=args.dtype, device=args.device,
                                  quantization_bits=args.quantize)
    max_length = args.max_length or int(getattr(model.config, "model_max_length", 0) or 4096)
    if args.stride is not None and args.stride > max_length:
        parser.error(f"--stride {args.stride}: at most the window length {max_length}")
    result = perplexity(model, documents, max_length, args.stride, args.batch_size, empty_documents=empty)
    print(format_result(result, args.perplexity, args.model))
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result.to_dict(), "model": str(args.model), "data": args.perplexity},
                                  indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output_json}")
    return 0
