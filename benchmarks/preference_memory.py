"""Peak memory of one DPO step against one supervised step, same tokens, real vocabulary, CPU.

Builds the tiny Baichuan2 with the real 125,696-piece tokenizer (``../shared/baichuan2/tokenizer.model``)
and model_max_length 4096, then in a fresh process per mode runs one step on 2 x 4096 tokens:

- ``sft``: ``BaichuanForCausalLM`` with ``losses.CausalLMLoss`` on a batch of 2 rows of 4096 tokens;
- ``dpo``: one pair (chosen and rejected rows of 4096 tokens each, prompt 2048 + answer 2048, in one
  forward, as ``PreferenceTrainer`` batches them): the reference log-probs (no grad), then the policy's
  through ``losses.SequenceLogProbs`` and the DPO loss, then backward.

The figure is the growth of peak RSS during the step above what was held before it (model,
gradients of earlier steps: none, optimizer: none).

Usage: python benchmarks/preference_memory.py [--seq 4096] [--tokenizer ../shared/baichuan2/tokenizer.model] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import common


def run_mode(mode: str, model_dir: str, seq: int) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from baichuan_finetune.objectives.losses import CausalLMLoss, SequenceLogProbs
    from baichuan_finetune.training.preference import PreferenceObjective

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, seq))
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # DPO: the prompt half is not scored
    if mode == "sft":
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # supervised: a user turn's worth unlabelled
    mask = torch.ones_like(ids)
    baseline = common.rss_bytes()
    start = time.perf_counter()
    if mode == "sft":
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, head_loss=CausalLMLoss()).loss
    else:
        with torch.no_grad():  # the reference (LoRA: the same model, adapters disabled)
            ref = model(input_ids=ids, attention_mask=mask, labels=labels, head_loss=SequenceLogProbs(2)).loss
        logps = model(input_ids=ids, attention_mask=mask, labels=labels, head_loss=SequenceLogProbs(2)).loss
        counts = (labels[:, 1:] != -100).sum(-1)
        loss, _ = PreferenceObjective()(logps, counts, ref)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = common.peak_rss_bytes()
    return {"loss": loss.item(), "peak_growth_bytes": peak - baseline, "seconds": seconds, "vocab": vocab}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--tokenizer", default=str(common.TOKENIZER))
    parser.add_argument("--_mode", help=argparse.SUPPRESS)
    parser.add_argument("--_model", help=argparse.SUPPRESS)
    common.add_json_argument(parser)
    args = parser.parse_args()
    if args._mode:
        print(json.dumps(run_mode(args._mode, args._model, args.seq)))
        return
    from baichuan_finetune.builder.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "tiny", tokenizer_model=args.tokenizer, model_max_length=args.seq)
        report = common.Report(args)
        report.line(f"one step on 2 x {args.seq} tokens, tiny Baichuan2 (hidden 128, 2 layers) with the real "
                    "vocabulary, float32, CPU; peak RSS growth during forward+backward")
        results = {mode: common.run_child(__file__, ["--seq", str(args.seq), "--_mode", mode, "--_model", str(model_dir)])
                   for mode in ("sft", "dpo")}
    what = {"sft": "supervised (CausalLMLoss)", "dpo": "DPO (reference + policy, SequenceLogProbs)"}
    report.table(["mode", "peak growth GiB", "seconds", "vocab", "loss", "what"],
                 [[mode, f"{r['peak_growth_bytes'] / 2**30:.2f}", f"{r['seconds']:.1f}", r["vocab"], f"{r['loss']:.4f}",
                   what[mode]] for mode, r in results.items()])
    report.finish(results=results)


if __name__ == "__main__":
    main()
