"""Predicted vs measured memory: the planner's CPU prediction against real 2-process DeepSpeed runs.

    python benchmarks/memory.py [--configs all|NAME,...] [--hidden 512] [--layers 8] [--steps 2] [--json PATH]

Builds a Baichuan2 of ~150 M parameters with the real 125,696-piece tokenizer
(``../shared/baichuan2/tokenizer.model``; hidden 512, 8 layers, 8 heads, intermediate 1376: the
embedding and head are 129 M of it, as the vocabulary dominates small models), then for each
configuration runs ``fine-tune/fine-tune.py`` under ``torchrun --nproc_per_node 2`` on the CPU
(float32, one thread per process, ``--padding max_length`` so every row is exactly the sequence
length, ``--max_steps 2``), one configuration at a time.

Measurement: with ``BAICHUAN_FINETUNE_MEMORY_LOG`` set, each rank records its VmRSS just before the
model is loaded and resets its VmHWM there (``plan.memory_probe_start``). When the Trainer logs
``train_runtime`` (every rank has finished its last step: the loss logging is a collective), this
script stops both ranks (SIGSTOP), reads their VmHWM, and lets them go on to save. Measured = peak
minus baseline, per rank; the table shows the larger rank. Predicted = ``plan.estimate`` for the same
configuration with ``device="cpu"``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import common
from common import DATA, REPO_ROOT, TOKENIZER

GIB = 1024**3

# (name, zero option, method, sequence length, micro-batch): both stages x full/LoRA, each at two of
# the four (length, batch) points, so that every length and batch size appears for every stage.
CONFIGS = [
    ("z2-full-256x1", "zero2", "full", 256, 1),
    ("z2-full-1024x2", "zero2", "full", 1024, 2),
    ("z3-full-256x2", "zero3", "full", 256, 2),
    ("z3-full-1024x1", "zero3", "full", 1024, 1),
    ("z2-lora-256x2", "zero2", "lora", 256, 2),
    ("z2-lora-1024x1", "zero2", "lora", 1024, 1),
    ("z3-lora-256x1", "zero3", "lora", 256, 1),
    ("z3-lora-1024x2", "zero3", "lora", 1024, 2),
]


def _kib(pid: int, field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def measure(name: str, flags: list[str], env: dict, log_dir: Path, nproc: int) -> list[dict]:
    """Run one configuration; per rank {baseline, peak, growth} in bytes."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), str(REPO_ROOT / "fine-tune" / "fine-tune.py"), *flags]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    ranks: list[dict] | None = None
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        if ranks is None and "train_runtime" in line:
            infos = [json.loads(p.read_text()) for p in sorted(log_dir.glob("rank*.json"))]
            for info in infos:
                os.kill(info["pid"], signal.SIGSTOP)  # nothing more happens while the peaks are read
            try:
                ranks = [{"baseline": info["baseline_kib"] * 1024, "peak": _kib(info["pid"], "VmHWM") * 1024}
                         for info in infos]
            finally:
                for info in infos:
                    os.kill(info["pid"], signal.SIGCONT)
    proc.wait()
    if proc.returncode != 0 or ranks is None:
        sys.exit(f"{name}: fine-tune.py exited {proc.returncode}:\n{''.join(tail)}")
    for r in ranks:
        r["growth"] = r["peak"] - r["baseline"]
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="all", help="comma-separated names from the table, or all")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    common.add_json_argument(parser)
    parser.add_argument("--replay", metavar="JSON",
                        help="no runs: re-predict the measurements recorded by --json with the current planner")
    args = parser.parse_args()
    if args.replay:
        replay(args, common.Report(args))
        return
    for path in (TOKENIZER, DATA):
        if not path.is_file():
            sys.exit(f"{path} is absent: the benchmark needs ../shared (real tokenizer and data)")
    wanted = [c for c in CONFIGS if args.configs == "all" or c[0] in args.configs.split(",")]
    if not wanted:
        sys.exit(f"--configs {args.configs}: none of {', '.join(c[0] for c in CONFIGS)}")

    from baichuan_finetune.options import plan
    from baichuan_finetune.builder.tiny import make_tiny_model

    out = common.Report(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark_memory_") as tmp:
        tmp = Path(tmp)
        lines = [line for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
        (tmp / "train.jsonl").write_text("\n".join(lines[:32]) + "\n", encoding="utf-8")
        model_dir = make_tiny_model(tmp / "model", tokenizer_model=TOKENIZER, hidden_size=args.hidden,
                                    intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads, model_max_length=max(c[3] for c in CONFIGS))
        shape = plan.load_shape(str(model_dir))
        out.line(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
                 f"{args.intermediate}, vocab {shape.vocab_size}: {shape.params / 1e6:.1f} M parameters; "
                 f"{args.nproc} processes (torchrun, CPU, float32, 1 thread each), {args.steps} steps")
        for name, option, method, seq, batch in wanted:
            log_dir = tmp / f"log-{name}"
            log_dir.mkdir()
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "BAICHUAN_FINETUNE_MEMORY_LOG": str(log_dir),
                   "BAICHUAN_FINETUNE_CACHE": str(tmp / "cache")}
            flags = ["--model_name_or_path", str(model_dir), "--data_path", str(tmp / "train.jsonl"),
                     "--output_dir", str(tmp / f"out-{name}"), "--model_max_length", str(seq),
                     "--padding", "max_length", "--per_device_train_batch_size", str(batch),
                     "--max_steps", str(args.steps), "--learning_rate", "1e-4", "--save_strategy", "no",
                     "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True", "--use_cpu", "True",
                     "--deepspeed", str(plan.CONFIG_DIR / plan.SHIPPED_CONFIG[option]), "--skip_memory_check", "True"]
            if method == "lora":
                flags += ["--use_lora", "True"]
            start = time.perf_counter()
            ranks = measure(name, flags, env, log_dir, args.nproc)
            est = predict(shape, option, method, seq, batch, args.nproc)
            measured = max(r["growth"] for r in ranks)
            row = {"name": name, "option": option, "method": method, "seq_len": seq, "micro_batch": batch,
                   "predicted_bytes": est.peak, "phase": est.phase, "measured_bytes": measured,
                   "ranks": ranks, "ratio": est.peak / measured, "terms": est.terms, "shape": asdict(shape),
                   "wall_s": round(time.perf_counter() - start, 1)}
            results.append(row)
            per_rank = ", ".join(f"{r['growth'] / GIB:.3f}" for r in ranks)
            out.line(f"{name:<16} predicted {est.peak / GIB:6.3f} GiB ({est.phase:<14}) measured "
                     f"{measured / GIB:6.3f} GiB (ranks {per_rank}) "
                     f"ratio {row['ratio']:.3f}  [{row['wall_s']:.0f} s]")

    report(out, results)


def predict(shape, option: str, method: str, seq: int, batch: int, nproc: int):
    """The planner's CPU estimate for one benchmark configuration."""
    from baichuan_finetune.options import plan

    zero = plan.ds_config(option)["zero_optimization"]  # the shipped file of `option`
    setup = plan.Setup(shape=shape, method=method, nodes=1, gpus_per_node=nproc, seq_len=seq, micro_batch=batch,
                       device="cpu", ds_overrides={k: v for k, v in zero.items() if not isinstance(v, dict)})
    return plan.estimate(setup, option)


def replay(args, out) -> None:
    """Re-predict recorded measurements (model shape from the recorded arguments).

    A file is a record of ``--json`` (its ``results``) or, from before the shared report, the list itself."""
    from baichuan_finetune.options import plan
    from baichuan_finetune.model.specs_baichuan import ROPE, VOCAB_SIZE

    results = []
    for path in args.replay.split(","):
        recorded = json.loads(Path(path).read_text())
        results += recorded["results"] if isinstance(recorded, dict) else recorded
    for r in results:
        shape = (plan.ModelShape(**r["shape"]) if "shape" in r else  # runs recorded before shapes were
                 plan.ModelShape(VOCAB_SIZE, args.hidden, args.intermediate, args.layers, args.heads, ROPE))
        est = predict(shape, r["option"], r["method"], r["seq_len"], r["micro_batch"], len(r["ranks"]))
        r.update(predicted_bytes=est.peak, phase=est.phase, ratio=est.peak / r["measured_bytes"], terms=est.terms)
    order = [c[0] for c in CONFIGS]
    results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    report(out, results)


def report(out, results: list[dict]) -> None:
    """The table of every configuration and the target; ``results`` go into the ``--json`` record."""
    out.table(["configuration", "ZeRO", "method", "L", "B", "predicted GiB", "measured GiB", "pred/meas"],
              [[r["name"], r["option"], r["method"], r["seq_len"], r["micro_batch"],
                f"{r['predicted_bytes'] / GIB:.3f}", f"{r['measured_bytes'] / GIB:.3f}", f"{r['ratio']:.3f}"]
               for r in results])
    worst = max(abs(r["ratio"] - 1) for r in results)
    out.line(f"\ntarget (every prediction within 15% of the measurement): {'met' if worst <= 0.15 else 'NOT met'} "
             f"(worst {100 * worst:.1f}%)")
    out.finish(results=results)

if __name__ == "__main__":
    main()
