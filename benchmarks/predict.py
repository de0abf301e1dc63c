"""Batched prediction against one prompt at a time: generated tokens/s, same prompts, same answers.

    python benchmarks/predict.py [--prompts 64] [--batch_size 16] [--max_new_tokens 64] [--threads 2] [--json PATH]

The model is the tiny Baichuan2 (hidden 128, 2 layers) with the real 125,696-piece tokenizer of
``../shared/baichuan2`` (as benchmarks/train.py), so the output head weighs on every decoding step as
the vocabulary does in the real models (the embedded tokenizer when ../shared is absent). The prompts
are the first user turns of ``../shared/data/medicalgpt_sharegpt_zh_1k.jsonl`` (the quickstart data when
absent). Both modes run ``evaluation.batch_generation.generate_batch`` greedily with the same settings;
only ``batch_size`` differs (1 vs 16), and the script checks that every answer is the same token for token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from baichuan_finetune.builder.tiny import make_tiny_model
from baichuan_finetune.evaluation.batch_generation import generate_batch
from baichuan_finetune.evaluation.prompts import chat_prompt_ids, read_prompts
from baichuan_finetune.model.configuration_baichuan import chat_generation_config
from baichuan_finetune.tools.loading import load_model

import common

QUICKSTART = common.REPO_ROOT / "data" / "quickstart.json"


def timed(model, tokenizer, prompts, batch_size: int, max_new_tokens: int, config) -> tuple[list, float]:
    start = time.perf_counter()
    answers = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             generation_config=config)
    return answers, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=4.0, help="required speed-up of batching")
    common.add_json_argument(parser)
    args = parser.parse_args()
    report = common.Report(args)
    torch.set_num_threads(args.threads)
    tokenizer_file = common.TOKENIZER if common.TOKENIZER.exists() else None
    data = common.DATA if common.DATA.exists() else QUICKSTART
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "tiny", tokenizer_model=tokenizer_file, model_max_length=1024)
        model, tokenizer = load_model(model_dir, dtype="float32")
    # The model's chat config, greedy (no sampling noise to compare), its repetition penalty kept.
    config = chat_generation_config(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
    first_questions = [[next(m for m in p.messages if m["role"] == "user")] for p in read_prompts(data)]
    prompts = [chat_prompt_ids(model.config.model_max_length, tokenizer, messages, args.max_new_tokens)
               for messages in first_questions[: args.prompts]]
    lengths = sorted(len(p) for p in prompts)
    report.line(f"model: tiny Baichuan2 (hidden 128, 2 layers, vocab {model.config.vocab_size}), float32, "
                f"{args.threads} threads")
    report.line(f"prompts: {len(prompts)} first user turns of {data.name} ({lengths[0]}-{lengths[-1]} tokens, "
                f"median {lengths[len(lengths) // 2]}); greedy, at most {args.max_new_tokens} new tokens")
    timed(model, tokenizer, prompts[:2], 2, 4, config)  # warm-up: first-call allocations and kernels
    one, one_s = timed(model, tokenizer, prompts, 1, args.max_new_tokens, config)
    batched, batched_s = timed(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, config)
    if [a.token_ids for a in batched] != [a.token_ids for a in one]:
        differing = sum(a.token_ids != b.token_ids for a, b in zip(batched, one))
        report.line(f"FAILED: {differing} of {len(prompts)} batched answers differ from the one-at-a-time answers")
        return 1
    tokens = sum(a.new_tokens for a in one)
    rows = [["one at a time (batch 1)", tokens, one_s, tokens / one_s, 1.0],
            [f"batched (batch {args.batch_size})", tokens, batched_s, tokens / batched_s, one_s / batched_s]]
    report.table(["mode", "new tokens", "seconds", "tokens/s", "speed-up"], rows,
                 title="generated tokens/s (the same answers, token for token)")
    speedup = one_s / batched_s
    met = "met" if speedup >= args.target else "NOT met"
    report.line(f"\ntarget (batched >= {args.target:g}x one at a time, identical answers): {met} ({speedup:.2f}x)")
    report.finish(results={"tokens": tokens, "one_s": one_s, "batched_s": batched_s, "speedup": speedup})
    return 0 if speedup >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
