"""Training throughput of the three batching modes: official pad-to-max, dynamic padding, packing.

    python benchmarks/train.py [--train 64] [--eval 16] [--model_max_length 2048] [--threads 2] [--json PATH]

One invocation, one process tree: this process builds a tiny Baichuan2 with the real 125,696-piece
tokenizer (``../shared/baichuan2/tokenizer.model``), takes the first conversations of
``../shared/data/medicalgpt_sharegpt_zh_1k.jsonl`` (train) and the next ones (held out), then runs
``fine-tune/fine-tune.py`` once per mode as a child process: same model, same seed, same
conversations, one epoch, same learning rate. Packing puts several conversations in a row, so it gets
a per-device batch of rows scaled down to carry about as many tokens per optimizer step as the
other modes (``round(batch * packed_rows / examples)``). Each child writes ``throughput.json``
(tokens, supervised tokens, batch slots, train runtime); the held-out loss of every trained model is
measured here the same way for all modes (unpacked, one conversation at a time, mean over all
supervised tokens). Peak memory is the child's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import DATA, REPO_ROOT, TOKENIZER

MODES = {
    "official": ["--padding", "max_length"],
    "dynamic": ["--padding", "longest"],
    "packing": ["--packing", "True"],
}


def run_mode(name: str, flags: list[str], env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "fine-tune" / "fine-tune.py"), *flags], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{name}: fine-tune.py exited {proc.returncode}:\n{output[-5000:]}")
    return {"wall_s": time.perf_counter() - start, "maxrss_mib": usage.ru_maxrss / 1024}


def held_out_loss(model_dir: Path, eval_dataset) -> float:
    """Mean cross-entropy over every supervised token of the held-out conversations."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in eval_dataset:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            if n:
                total += model(input_ids=ids, labels=labels).loss.item() * n
                count += n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=64, help="training conversations")
    parser.add_argument("--eval", type=int, default=16, help="held-out conversations")
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=4, help="per-device batch of the unpacked modes")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of each training process")
    parser.add_argument("--modes", default=",".join(MODES))
    common.add_json_argument(parser)
    args = parser.parse_args()
    report = common.Report(args)
    for path in (TOKENIZER, DATA):
        if not path.is_file():
            sys.exit(f"{path} is absent: the benchmark needs ../shared (real tokenizer and data)")

    import torch

    torch.set_num_threads(args.threads)
    from baichuan_finetune.options.arguments import DataArguments
    from baichuan_finetune.data.preprocess import prepare_data
    from baichuan_finetune.builder.tiny import make_tiny_model
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="benchmark_train_") as tmp:
        tmp = Path(tmp)
        lines = [line for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
        (tmp / "train.jsonl").write_text("\n".join(lines[: args.train]) + "\n", encoding="utf-8")
        (tmp / "eval.jsonl").write_text("\n".join(lines[args.train: args.train + args.eval]) + "\n",
                                        encoding="utf-8")
        model_dir = make_tiny_model(tmp / "model", tokenizer_model=TOKENIZER, model_max_length=args.model_max_length)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cache = tmp / "cache"
        data_report = prepare_data(DataArguments(data_path=str(tmp / "train.jsonl"), data_cache_dir=str(cache)),
                                   tokenizer, args.model_max_length).report
        eval_dataset = prepare_data(DataArguments(data_path=str(tmp / "eval.jsonl"), data_cache_dir=str(cache)),
                                    tokenizer, args.model_max_length).train_dataset
        packed = prepare_data(DataArguments(data_path=str(tmp / "train.jsonl"), data_cache_dir=str(cache),
                                            packing=True), tokenizer, args.model_max_length).train_dataset
        pack_batch = max(1, round(args.batch_size * len(packed) / data_report.examples))
        report.line(f"model: tiny Baichuan2 (hidden 128, 2 layers, vocab {tokenizer.vocab_size}), "
                    f"model_max_length {args.model_max_length}")
        report.line(f"data: {DATA.name}: {data_report.examples} training conversations ({data_report.tokens} "
                    f"tokens, {data_report.supervised_tokens} supervised, {data_report.truncated} truncated), "
                    f"{len(eval_dataset)} held out; {len(packed)} packed rows")
        report.line(f"batch: {args.batch_size} conversations per step (official, dynamic), {pack_batch} packed rows "
                    f"per step (packing); 1 epoch, lr {args.learning_rate}, {args.threads} threads per process")

        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "BAICHUAN_FINETUNE_CACHE": str(cache)}
        results = {}
        for name in args.modes.split(","):
            out = tmp / f"out-{name}"
            batch = pack_batch if name == "packing" else args.batch_size
            flags = ["--model_name_or_path", str(model_dir), "--data_path", str(tmp / "train.jsonl"),
                     "--output_dir", str(out), "--model_max_length", str(args.model_max_length),
                     "--per_device_train_batch_size", str(batch), "--num_train_epochs", "1",
                     "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant",
                     "--seed", "42", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
                     "--disable_tqdm", "True", "--use_cpu", "True", *MODES[name]]
            print(f"running {name} ...", flush=True)
            run = run_mode(name, flags, env)
            stats = json.loads((out / "throughput.json").read_text())
            stats.update(run, eval_loss=held_out_loss(out, eval_dataset))
            results[name] = stats

    base = results.get("official")
    report.line(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for name, r in results.items():
        speedup = r["supervised_tokens_per_second"] / base["supervised_tokens_per_second"] if base else float("nan")
        loss_delta = r["eval_loss"] / base["eval_loss"] - 1 if base else float("nan")
        rows.append([name, f"{r['supervised_tokens_per_second']:.1f}", f"{r['tokens_per_second']:.1f}",
                     f"{r['real_token_share']:.1%}", f"{r['maxrss_mib']:.0f}", f"{r['eval_loss']:.4f}",
                     f"{speedup:.2f}x", f"{loss_delta:+.2%}", f"{r['train_runtime']:.1f}"])
    report.table(["mode", "sup tok/s", "all tok/s", "real share", "peak MiB", "eval loss", "x sup tok/s",
                  "eval vs off", "train s"], rows)
    if base and "packing" in results:
        p = results["packing"]
        speedup = p["supervised_tokens_per_second"] / base["supervised_tokens_per_second"]
        delta = abs(p["eval_loss"] / base["eval_loss"] - 1)
        ok = speedup >= 3.0 and delta <= 0.02
        report.line(f"\ntarget (packing >= 3x official supervised tokens/s, held-out loss within 2%): "
                    f"{'met' if ok else 'NOT met'} ({speedup:.2f}x, {delta:.2%})")
    report.finish(results=results)


if __name__ == "__main__":
    main()
