"""Peak resident memory while streaming (--streaming True) 10,000 against 2,000,000 short documents.

    python benchmarks/streaming_rss.py [--sizes 10000 2000000] [--model_max_length 512] [--batch_size 8]
                                       [--workers 0] [--json PATH]

Each size runs in a fresh process: it writes that many generated one-line documents (8 to 40 words,
numbered, so no two are alike) to a temporary .txt file, then reads one epoch of this rank's stream
exactly as training does (`streaming.StreamLoader` over `StreamingDataset`: datasets' lazy source, the
mix, tokenizing and packing `WINDOW` documents at a time, collated batches of `--batch_size` rows of
`--model_max_length`) with the real Baichuan2 tokenizer, and reports the process's peak RSS (with
``--workers N``, the dataloader workers' peak RSS is added, sampled while they run). The target (issue 18):
flat, the peak at 2,000,000 under 1.5x the peak at 10,000.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

WORDS = ("river", "stone", "market", "window", "theory", "garden", "signal", "harbour", "lantern", "copper",
         "meadow", "engine", "whisper", "ledger", "orbit", "canvas", "feather", "tunnel", "harvest", "anchor")


def write_documents(path: Path, n: int) -> int:
    """`n` one-line documents; their bytes."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"Document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + ".\n")
    return path.stat().st_size


def children_rss(stop: threading.Event, peak: list[int]) -> None:
    """Sample the summed RSS of this process's children (dataloader workers) until `stop`."""
    import psutil

    me = psutil.Process()
    while not stop.wait(0.2):
        try:
            peak[0] = max(peak[0], sum(c.memory_info().rss for c in me.children(recursive=True)))
        except psutil.Error:
            pass


def child(n: int, args) -> dict:
    import sentencepiece as spm
    from baichuan_finetune.data.streaming import StreamConfig, StreamingDataset, StreamLoader

    sp = spm.SentencePieceProcessor(model_file=str(common.TOKENIZER))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.txt"
        size = write_documents(path, n)
        config = StreamConfig(sources=((str(path), None),), stage="pt", mix_strategy="concat", mix_seed=0,
                              model_max_length=args.model_max_length, batch_size=args.batch_size, packing=True)
        loader = StreamLoader(StreamingDataset(config, sp), args.workers)
        before = common.rss_bytes()
        stop, workers_peak = threading.Event(), [0]
        sampler = threading.Thread(target=children_rss, args=(stop, workers_peak), daemon=True)
        sampler.start()
        start = time.perf_counter()
        batches = tokens = 0
        documents = 0
        for batch in loader:
            later = [p for p in loader.positions.values() if p["epoch"] > 0]
            if later:  # the first batch of the second epoch: its counters before it are the first epoch's
                documents = later[0]["counts_before"].get("examples/0", 0)
                break
            batches += 1
            tokens += int((batch["attention_mask"] != 0).sum())
        seconds = time.perf_counter() - start
        stop.set()
    return {"documents": documents, "file_mb": size / 2**20, "tokens": tokens, "batches": batches,
            "seconds": seconds, "rss_before_mb": before / 2**20, "peak_rss_mb": common.peak_rss_bytes() / 2**20,
            "workers_peak_rss_mb": workers_peak[0] / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 2_000_000])
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    common.add_json_argument(parser)
    args = parser.parse_args()
    if args._child is not None:
        print(json.dumps(child(args._child, args)))
        return 0
    if not common.TOKENIZER.exists():
        print(f"needs {common.TOKENIZER}", file=sys.stderr)
        return 1
    report = common.Report(args)
    results = []
    for n in args.sizes:
        flags = ["--_child", str(n), "--model_max_length", str(args.model_max_length), "--batch_size",
                 str(args.batch_size), "--workers", str(args.workers)]
        results.append(common.run_child(__file__, flags))
    base = results[0]["peak_rss_mb"] + results[0]["workers_peak_rss_mb"]
    rows = [[f"{r['documents']:,}", f"{r['file_mb']:.1f}", f"{r['tokens']:,}", r["batches"],
             f"{r['documents'] / r['seconds']:,.0f}", f"{r['tokens'] / r['seconds']:,.0f}",
             f"{r['rss_before_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['workers_peak_rss_mb']:.0f}",
             f"{(r['peak_rss_mb'] + r['workers_peak_rss_mb']) / base:.2f}"] for r in results]
    report.table(["documents", "file MB", "tokens", "batches", "documents/s", "tokens/s", "RSS before MB",
                  "peak RSS MB", "workers' peak RSS MB", "peak / first"], rows,
                 title=f"one epoch of --streaming --stage pt, rows of {args.model_max_length}, "
                       f"batch {args.batch_size}, {args.workers} dataloader worker(s)")
    report.finish(results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
