"""Batch prediction on held-out prompts: answers, BLEU/ROUGE against references, one report for several models.

For each ``--model`` (a base model, a LoRA adapter, a merged model or a checkpoint directory) the prompts
are answered with ``evaluation.batch_generation.generate_batch`` (left-padded batches, KV cache) in one
process or in ``--num_gpus`` worker processes (each a strided shard of the prompts, on ``cuda:i`` or on
the CPU; the answers are put back in input order, so the files do not depend on the number of
processes). Under ``OUTPUT_DIR/<model label>/`` go ``predictions.jsonl`` (one line per prompt: id,
source, prompt, reference, prediction, new_tokens, finish_reason) and ``metrics.json`` (per example and
mean BLEU-4, ROUGE-1/2/L, exact match over the prompts with a reference); ``OUTPUT_DIR/report.md`` and
``report.html`` show every model side by side (``compare_report``).

Everything a user can get wrong (flags, the prompts file, each model directory, the output directory,
more processes than prompts) is checked before any model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from ..evaluation.batch_generation import Generation, generate_batch
from ..evaluation.metrics import text_metrics
from ..evaluation.prompts import Prompt, chat_prompt_ids, read_prompts
from .compare_report import REPORT_HTML, REPORT_MD, html_report, markdown_report
from .generation import add_generation_arguments, check_generation_arguments, make_generation_config
from .loading import DTYPES, chat_model, check_model_dir, load_model

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class PredictSettings:
    """How every model generates (the flags of ``baichuan-finetune predict``); None: the model's own
    generation config."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int = 42
    batch_size: int = 16
    dtype: str = "auto"
    device: str | None = None


def check_settings(settings: PredictSettings, num_gpus: int) -> None:
    """Refuse settings that would fail after loading: ``ValueError``, one line naming the flag."""
    check_generation_arguments(settings)
    if settings.batch_size < 1:
        raise ValueError(f"--batch_size {settings.batch_size}: expected a number >= 1")
    if num_gpus < 1:
        raise ValueError(f"--num_gpus {num_gpus}: expected a number >= 1")
    if num_gpus > 1 and settings.device is not None:
        raise ValueError(f"--device {settings.device} with --num_gpus {num_gpus}: each process picks its own "
                         "device (cuda:i, or the CPU where there is no GPU); leave --device out")


def model_labels(model_dirs: list[str]) -> list[str]:
    """A short, distinct, file-name-safe label per model directory: its last path part, with as many
    parent parts as it takes to tell two apart (``run1-checkpoint-500``), then a number."""
    parts = [Path(os.path.abspath(d)).parts for d in model_dirs]
    labels: list[str] = []
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["-".join(p[-depth:]).lstrip("/") or "root" for p in parts]
        if len(set(labels)) == len(labels):
            break
    labels = [re.sub(r"[^\w.-]+", "_", label) for label in labels]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}-{label}" for i, label in enumerate(labels)]
    return labels


def check_output_dir(path: str) -> Path:
    output_dir = Path(path)
    if output_dir.is_symlink() and not output_dir.exists():
        raise ValueError(f"--output_dir {path} is a dangling symbolic link")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {path} is a file")
    return output_dir


def check_inputs(model_dirs: list[str], prompts_file: str, output_dir: str, settings: PredictSettings,
                 num_gpus: int) -> list[Prompt]:
    """Every check before loading: flags, models, output directory (``ValueError``/``ModelDirError``, exit 2),
    the prompts (``DataError``, exit 1). Returns the prompts."""
    check_settings(settings, num_gpus)
    if not model_dirs:
        raise ValueError("--model: give at least one model directory")
    resolved = [os.path.realpath(d) for d in model_dirs]
    if len(set(resolved)) < len(resolved):
        raise ValueError("--model: the same directory is given twice")
    for model_dir in model_dirs:
        check_model_dir(model_dir)
    check_output_dir(output_dir)
    prompts = read_prompts(prompts_file)
    if num_gpus > len(prompts):
        raise ValueError(f"--num_gpus {num_gpus} is more than the {len(prompts)} prompt(s) of {prompts_file}: "
                         "a process would have nothing to answer")
    return prompts


def _worker_device(rank: int, num_processes: int, device: str | None) -> str | None:
    import torch

    if num_processes == 1:
        return device
    return f"cuda:{rank}" if torch.cuda.is_available() and rank < torch.cuda.device_count() else "cpu"


def answer_prompts(model_dir: str, messages: list[list[dict]], settings: PredictSettings, rank: int = 0,
                   num_processes: int = 1) -> list[dict]:
    """Load ``model_dir`` and answer ``messages`` (one process's share); ``Generation`` fields as dicts."""
    import torch

    if num_processes > 1 and not torch.cuda.is_available():
        # Worker processes share the CPU cores instead of each starting a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))
    model, tokenizer = load_model(model_dir, dtype=settings.dtype, device=_worker_device(rank, num_processes,
                                                                                           settings.device))
    config = make_generation_config(model, settings.max_new_tokens, settings.temperature, settings.top_p,
                                    settings.greedy)
    max_length = chat_model(model).config.model_max_length
    prompt_ids = [chat_prompt_ids(max_length, tokenizer, m, config.max_new_tokens) for m in messages]
    # Each process seeds differently: the same seed everywhere would sample the same noise on every shard.
    generations = generate_batch(model, tokenizer, prompt_ids, max_new_tokens=config.max_new_tokens,
                                 batch_size=settings.batch_size, do_sample=bool(config.do_sample),
                                 seed=settings.seed + rank, generation_config=config)
    return [asdict(g) for g in generations]


def predict_model(model_dir: str, prompts: list[Prompt], settings: PredictSettings,
                  num_processes: int = 1) -> list[Generation]:
    """The answers of one model to ``prompts``, in their order, from ``num_processes`` processes."""
    messages = [p.messages for p in prompts]
    if num_processes == 1:
        rows = answer_prompts(model_dir, messages, settings)
    else:
        shards = [list(range(rank, len(prompts), num_processes)) for rank in range(num_processes)]
        rows = [None] * len(prompts)
        # spawn: a forked child would inherit the parent's torch threads and locks half-initialised.
        with ProcessPoolExecutor(num_processes, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(answer_prompts, model_dir, [messages[i] for i in shard], settings, rank,
                                   num_processes) for rank, shard in enumerate(shards)]
            for shard, future in zip(shards, futures):
                for index, row in zip(shard, future.result()):
                    rows[index] = row
    return [Generation(**row) for row in rows]


def prediction_rows(prompts: list[Prompt], generations: list[Generation]) -> list[dict]:
    """One JSONL row per prompt, in input order."""
    return [{"id": i, "source": p.source, "prompt": p.text, "reference": p.reference, "prediction": g.text,
             "new_tokens": g.new_tokens, "finish_reason": g.finish_reason}
            for i, (p, g) in enumerate(zip(prompts, generations))]


def prediction_metrics(model_dir: str, rows: list[dict], settings: PredictSettings) -> dict:
    """``metrics.json``: means and per-example scores over the rows with a reference, and what was run."""
    scored = [row for row in rows if row["reference"] is not None]
    metrics = text_metrics([r["prediction"] for r in scored], [r["reference"] for r in scored])
    finish = {reason: sum(r["finish_reason"] == reason for r in rows) for reason in ("stop", "length")}
    return {"model": str(model_dir), "prompts": len(rows), "scored": metrics["count"], "mean": metrics["mean"],
            "new_tokens": sum(r["new_tokens"] for r in rows), "finish_reasons": finish,
            "settings": {k: v for k, v in asdict(settings).items() if k != "device"},
            "examples": [{"id": r["id"], **scores} for r, scores in zip(scored, metrics["examples"])]}


def write_text_file(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a killed run leaves earlier files intact and no half file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_lines(path: Path, rows: list[dict]) -> None:
    write_text_file(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def predict(model_dirs: list[str], prompts: list[Prompt], output_dir: str | Path, settings: PredictSettings,
            num_processes: int = 1, log=print) -> dict[str, dict]:
    """Answer ``prompts`` with every model, write each model's files and the report; metrics by label."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    answers: dict[str, list[dict]] = {}
    for label, model_dir in zip(model_labels(model_dirs), model_dirs):
        start = time.perf_counter()
        rows = prediction_rows(prompts, predict_model(model_dir, prompts, settings, num_processes))
        seconds = time.perf_counter() - start
        metrics = prediction_metrics(model_dir, rows, settings)
        (output_dir / label).mkdir(exist_ok=True)
        write_json_lines(output_dir / label / PREDICTIONS_FILE, rows)
        write_text_file(output_dir / label / METRICS_FILE, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
        results[label], answers[label] = metrics, rows
        mean = metrics["mean"]
        scores = ", ".join(f"{k} {v:.2f}" for k, v in mean.items() if v is not None) or "no references"
        log(f"{label}: {len(rows)} prompts, {metrics['new_tokens']} new tokens in {seconds:.1f}s "
            f"({metrics['new_tokens'] / max(seconds, 1e-9):.1f} tokens/s); {scores}")
    reports = [output_dir / REPORT_MD, output_dir / REPORT_HTML]
    write_text_file(reports[0], markdown_report(prompts, answers, results))
    write_text_file(reports[1], html_report(prompts, answers, results))
    log(f"wrote {output_dir}/<model>/{PREDICTIONS_FILE}, {METRICS_FILE} and {', '.join(str(p) for p in reports)}")
    return results


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``baichuan-finetune predict``."""
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="model directory (base, LoRA adapter, merged or checkpoint); repeat to compare models")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="prompts: a conversation file (any training format; the last assistant turn is the "
                             "reference), JSONL/JSON of {\"prompt\", \"reference\"?}, or a .txt with one per line")
    parser.add_argument("--output_dir", required=True, help="where predictions, metrics and the report go")
    add_generation_arguments(parser)
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling (process i uses seed + i)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate call (default 16)")
    parser.add_argument("--num_gpus", type=int, default=1,
                        help="worker processes, each answering a shard (cuda:i, or the CPU without GPUs)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights dtype (auto: as stored)")
    parser.add_argument("--device", default=None, help="one process: e.g. cuda, cuda:0, cpu")


def settings_from(args: argparse.Namespace) -> PredictSettings:
    return PredictSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           greedy=args.greedy, seed=args.seed, batch_size=args.batch_size, dtype=args.dtype,
                           device=args.device)

