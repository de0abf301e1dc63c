"""``baichuan-finetune eval``: k-shot multiple-choice evaluation of a model directory (C-Eval / CMMLU /
MMLU layouts), its flags checked before the model loads, the table, and the results in
lm-evaluation-harness's shape. Reading the questions, the prompts and the scoring are
`evaluation.multiple_choice`'s (training's forgetting guard uses them too).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..evaluation.multiple_choice import (
    EvalDataError, evaluate_task, file_layout, find_split, parse_columns, question_files, read_questions, read_shots,
    subject_names,
)
from .loading import creation_problem, load_model

__all__ = ["EvalDataError", "check_arguments", "format_table", "harness_results", "run", "write_samples"]

def format_table(report: dict) -> str:
    rows = [(s, str(r["total"]), f"{100 * r['accuracy']:.2f}") for s, r in report["subjects"].items()]
    rows.append(("average (over subjects)", str(report["questions"]), f"{100 * report['average_accuracy']:.2f}"))
    rows.append(("overall (over questions)", str(report["questions"]), f"{100 * report['overall_accuracy']:.2f}"))
    widths = [max(len(r[i]) for r in rows + [("subject", "questions", "accuracy %")]) for i in range(3)]

    def line(r: tuple) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}"

    out = [line(("subject", "questions", "accuracy %")), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows[:-2]] + [line(tuple("-" * w for w in widths))] + [line(r) for r in rows[-2:]]
    return "\n".join(out)


def layout_flags(args) -> tuple[dict | None, str | None, bool | None]:
    """(columns, answer_format, header) as given on the command line; all None: detect each file's layout."""
    columns = parse_columns(args.columns) if args.columns else None
    return columns, getattr(args, "answer_format", None), (False if getattr(args, "no_header", False) else None)


def check_arguments(args) -> None:
    """Everything ``scripts/evaluate.py`` can check before loading a model.

    Raises ``ValueError`` (flags and paths: exit 2) or `EvalDataError` (the question files: exit 1),
    one line each: numbers in range, the model directory loadable, the task layout, the subjects and
    their dev files, every question file readable with the columns and answers asked for, and the
    report's path.
    """
    from .loading import check_model_dir

    for flag, value, least in (("--shots", args.shots, 0), ("--limit", args.limit, 1), ("--batch_size", args.batch_size, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: expected a number >= {least}")
    columns, answer_format, header = layout_flags(args)
    if getattr(args, "log_samples", False) and not args.output_json:
        raise ValueError("--log_samples: needs --output_json (the samples go next to it)")
    check_model_dir(args.model)
    task_dir = Path(args.task_dir)
    if not task_dir.is_dir():
        raise ValueError(f"--task_dir {args.task_dir}: no such directory")
    try:
        split_dir = find_split(task_dir, args.split)
    except FileNotFoundError as e:
        raise ValueError(f"--task_dir/--split: {e}") from None
    files = question_files(split_dir)
    subjects = args.subjects.split(",") if args.subjects else sorted(files)
    missing = sorted(set(subjects) - set(files))
    if missing:
        raise ValueError(f"--subjects: no {split_dir.name} file for {', '.join(missing)} in {split_dir}")
    if not subjects:
        raise ValueError(f"--task_dir {args.task_dir}: no question files (CSV, JSON, JSONL) in {split_dir}")
    dev_dir = task_dir / "dev"
    dev_files = question_files(dev_dir) if args.shots else {}
    layouts = {}
    for subject in subjects:
        layouts[subject] = file_layout(files[subject], columns, answer_format, header)
        read_questions(files[subject], layouts[subject], args.limit)
        if args.shots:
            if subject not in dev_files:
                raise ValueError(f"--shots {args.shots}: {dev_dir} has no file for {subject}")
            read_shots(dev_files[subject], file_layout(dev_files[subject], columns, answer_format, header), args.shots)
    subject_names(task_dir, args.prompt_style or next(iter(layouts.values())).prompt_style)
    if args.output_json:
        out = Path(args.output_json)
        if out.is_dir():
            raise ValueError(f"--output_json {args.output_json}: is a directory")
        problem = creation_problem(out.resolve().parent)
        if problem is not None:
            raise ValueError(f"--output_json {args.output_json}: {problem}")


def run(args) -> dict:
    """What ``scripts/evaluate.py`` does: load, evaluate, print the table, write the JSON.

    Call `check_arguments` first: it finds bad flags, paths and question files before the model loads.
    """
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, quantization_bits=args.quantize)
    columns, answer_format, header = layout_flags(args)
    report = evaluate_task(
        model, tokenizer, args.task_dir, shots=args.shots, split=args.split,
        subjects=args.subjects.split(",") if args.subjects else None, limit=args.limit,
        columns=columns, answer_format=answer_format, prompt_style=args.prompt_style,
        batch_size=args.batch_size, header=header,
    )
    report["model"] = str(args.model)
    print(f"{report['shots']}-shot {report['split']} of {args.task_dir} with {args.model}:")
    print(format_table(report))
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        # allow_nan=False: a bare NaN is not JSON (json.loads in other languages and jq refuse it).
        out.write_text(json.dumps(harness_results(report, args), ensure_ascii=False, indent=2, allow_nan=False) + "\n",
                       encoding="utf-8")
        print(f"wrote {args.output_json}")
        if getattr(args, "log_samples", False):
            for subject, path in write_samples(report, out).items():
                print(f"wrote {path}")
    return report


def _stderr(correct: int, total: int) -> float | None:
    """Standard error of the mean accuracy, as lm-evaluation-harness computes it (sample stdev / sqrt(n));
    None (JSON null) for one question, where it is undefined (the harness writes "N/A" there)."""
    if total < 2:
        return None
    p = correct / total
    return math.sqrt(p * (1 - p) * total / (total - 1) / total)


def task_name(report: dict) -> str:
    return Path(report["task_dir"]).resolve().name


def harness_results(report: dict, args=None) -> dict:
    """The report in lm-evaluation-harness's results shape: ``results`` (per subject task and the
    group: ``acc,none`` and ``acc_stderr,none``; no ``acc_norm``, which needs scored option texts,
    not letters), ``groups``, ``group_subtasks``, ``n-shot``, ``n-samples``, ``config``, plus our
    per-subject details under ``baichuan_finetune``."""
    group = task_name(report)
    results, n_shot, n_samples = {}, {}, {}
    for subject, r in report["subjects"].items():
        task = f"{group}_{subject}"
        results[task] = {"alias": f" - {subject}", "acc,none": r["accuracy"],
                         "acc_stderr,none": _stderr(r["correct"], r["total"])}
        n_shot[task] = report["shots"]
        n_samples[task] = {"original": r["total"], "effective": r["total"]}
    correct = sum(r["correct"] for r in report["subjects"].values())
    total = report["questions"]
    group_entry = {"alias": group, "acc,none": report["overall_accuracy"], "acc_stderr,none": _stderr(correct, total)}
    config = {"model": "baichuan_finetune", "model_args": f"pretrained={report.get('model')}",
              "batch_size": getattr(args, "batch_size", None), "limit": getattr(args, "limit", None),
              "num_fewshot": report["shots"], "device": getattr(args, "device", None),
              "dtype": getattr(args, "dtype", None), "quantize": getattr(args, "quantize", None),
              "split": report["split"], "prompt_style": report["prompt_style"], "task_dir": report["task_dir"]}
    return {
        "results": {group: group_entry, **results},
        "groups": {group: group_entry},
        "group_subtasks": {group: sorted(results)},
        "configs": {task: {"task": task, "num_fewshot": report["shots"], "output_type": "multiple_choice",
                           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                           "dataset_path": report["subjects"][task[len(group) + 1:]]["file"]}
                    for task in results},
        "versions": {task: 1.0 for task in [group, *results]},
        "n-shot": n_shot,
        "higher_is_better": {task: {"acc": True} for task in [group, *results]},
        "n-samples": n_samples,
        "config": config,
        "date": time.time(),
        "total_evaluation_time_seconds": str(report["seconds"]),
        "baichuan_finetune": {k: v for k, v in report.items() if k != "subjects"} | {
            "subjects": {s: {k: v for k, v in r.items() if k not in ("questions", "targets")}
                         for s, r in report["subjects"].items()}},
    }


def write_samples(report: dict, output_json: Path) -> dict[str, Path]:
    """``--log_samples``: one JSONL per subject task next to the results (``samples_<task>.jsonl``, as the
    harness names them), a line per question: doc_id, doc (question, choices), target, prediction, acc."""
    written = {}
    group = task_name(report)
    for subject, r in report["subjects"].items():
        task = f"{group}_{subject}"
        path = output_json.parent / f"samples_{task}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, (doc, target, pred) in enumerate(zip(r["questions"], r["targets"], r["predictions"])):
                f.write(json.dumps({"doc_id": i, "doc": doc, "target": target, "prediction": pred,
                                    "acc": float(pred == target)}, ensure_ascii=False) + "\n")
        written[subject] = path
    return written
