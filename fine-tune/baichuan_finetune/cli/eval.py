"""k-shot multiple-choice evaluation (C-Eval / CMMLU / MMLU CSV layouts) of any model directory.

    baichuan-finetune eval --model output/lora --task_dir ../shared/data/cmmlu_subset --shots 5
    python scripts/evaluate.py ...            (the same)

Each file's layout is detected: C-Eval CSV (id,question,A,B,C,D,answer), CMMLU CSV, MMLU CSV
(question,choice0..choice3,answer index; or the headerless original), MMLU/HF JSON or JSONL (question,
choices, answer index or letter). Prints a table of per-subject and average accuracy; --output_json
writes lm-evaluation-harness's results shape, --log_samples the per-question predictions next to it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..core.errors import exit_code
from ..tools.evaluate import EvalDataError, check_arguments, run
from ..tools.loading import ToolArgumentParser, add_model_arguments, one_line
from .config import parse_with_config


def build_parser(prog: str | None = None) -> ToolArgumentParser:
    parser = ToolArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--task_dir", required=True, help="folder with dev/ and val/ or test/ CSV files")
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
