"""k-shot multiple-choice evaluation (C-Eval / CMMLU / MMLU CSV layouts) of any model directory.

    python scripts/evaluate.py --model output/lora --task_dir ../shared/data/cmmlu_subset --shots 5

Prints a table of per-subject and average accuracy; --output_json writes the full report.
"""

import argparse

from baichuan_finetune.evaluate import run
from baichuan_finetune.loading import add_model_arguments


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--task_dir", required=True, help="folder with dev/ and val/ or test/ CSV files")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev/ (default 5)")
    parser.add_argument("--split", default=None, help="questions folder (default: val if present, else test)")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions per subject")
    parser.add_argument("--columns", default=None,
                        help="column mapping, e.g. question=Question,A=A,B=B,C=C,D=D,answer=Answer "
                             "(case-insensitive names, or 0-based positions)")
    parser.add_argument("--answer_format", default="letter", choices=["letter", "index"],
                        help="answers as A-D (letter) or 0-3 (index, MMLU-style exports)")
    parser.add_argument("--no_header", action="store_true", help="CSV files have no header row (original MMLU)")
    parser.add_argument("--prompt_style", default="zh", choices=["zh", "en"],
                        help="zh: C-Eval/CMMLU prompt (题目/答案：); en: MMLU prompt (Answer:)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_json", default=None, help="write the report (with predictions) here")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
