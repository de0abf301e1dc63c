"""End-to-end preprocessing throughput against raw single-thread sentencepiece, plus the cached re-run.

    python benchmarks/preprocess.py [--repeat 100] [--model_max_length 2048] [--workers N] [--json PATH]

Reads ../shared (the real tokenizer and medicalgpt_sharegpt_zh_1k.jsonl); writes only to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
from baichuan_finetune.data.preprocess import prepare_data
from baichuan_finetune.data.records import DataError
from baichuan_finetune.options.arguments import DataArguments

import common


def raw_encode_speed(sp, path: Path) -> tuple[int, float]:
    """Tokens and seconds of single-thread `sp.encode` over every message text of `path` (JSONL)."""
    texts = []
    for line in path.open(encoding="utf-8"):
        texts.extend(m["value"] for m in json.loads(line)["conversations"])
    tokens, seconds = 0, 0.0
    for start in range(0, len(texts), 20_000):  # batches keep memory bounded; only encode is timed
        batch = texts[start : start + 20_000]
        t = time.perf_counter()
        ids = sp.encode(batch, num_threads=1)
        seconds += time.perf_counter() - t
        tokens += sum(map(len, ids))
    return tokens, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=None)
    common.add_json_argument(parser)
    args = parser.parse_args()
    source, model = common.DATA, common.TOKENIZER
    if not source.exists() or not model.exists():
        print(f"needs {source} and {model}", file=sys.stderr)
        return 1
    report = common.Report(args)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "medical_repeated.jsonl"
        lines = source.read_text(encoding="utf-8").splitlines()
        with data.open("w", encoding="utf-8") as f:
            for r in range(args.repeat):
                for line in lines:
                    f.write(line + "\n")
        n_conv = len(lines) * args.repeat
        report.line(f"data: {source.name} x {args.repeat} = {n_conv} conversations, {data.stat().st_size / 1e6:.0f} MB")

        tokens, raw_s = raw_encode_speed(sp, data)
        data_args = DataArguments(data_path=str(data), data_cache_dir=str(Path(tmp) / "cache"),
                                  preprocessing_num_workers=args.workers)
        try:
            t = time.perf_counter()
            prepared = prepare_data(data_args, sp, args.model_max_length)
            first = time.perf_counter() - t
            t = time.perf_counter()
            again = prepare_data(data_args, sp, args.model_max_length)
            second = time.perf_counter() - t
        except DataError as e:
            print(e, file=sys.stderr)
            return 1
        report.table(["step", "seconds", "M tokens/s", "of the raw speed"],
                     [["raw sentencepiece.encode, 1 thread", f"{raw_s:.1f}", f"{tokens / raw_s / 1e6:.2f}", "1.00"],
                      ["prepare_data end to end (read + validate + encode + write Arrow)", f"{first:.1f}",
                       f"{tokens / first / 1e6:.2f}", f"{raw_s / first:.2f}"],
                      [f"cached re-run (from_cache={again.report.from_cache})", f"{second:.2f}",
                       f"{tokens / second / 1e6:.2f}", f"{raw_s / second:.2f}"]],
                     title=f"{tokens} text tokens; cached re-run {second / first:.1%} of the first run")
        report.line(prepared.report.format())
        report.finish(tokens=tokens, raw_seconds=raw_s, first_seconds=first, cached_seconds=second)
    return 0


if __name__ == "__main__":
    sys.exit(main())
