"""One-command GPU benchmark: attention kernels' correctness, then bf16 training steps at 7B and 13B width.

    python benchmarks/gpu.py                      # on one GPU: the whole table (under 8 minutes)
    python benchmarks/gpu.py --device cpu --quick # the correctness part only, small, on CPU
    (either with --json PATH: also write the command, machine and tables to PATH)

1. Correctness: a 2-layer model of 40 heads (ALiBi, then RoPE) on packed rows with padding (one row
   of three conversations and padding, one left-padded row). Every available implementation runs
   forward and backward in the benchmark dtype (bf16 on GPU, fp32 on CPU) against fp32 SDPA with
   the dense mask; printed: max |diff| of the outputs and of all gradients, relative to the largest
   reference value. bf16 SDPA is the yardstick: a kernel passes when its differences are at most
   twice bf16 SDPA's (+1e-3), or 1e-5 in fp32. On CPU FlexAttention runs forward only (no CPU backward).
2. Training (GPU only): a 7B-width (hidden 4096, intermediate 11008, 32 heads, RoPE) and a 13B-width
   (5120, 13696, 40 heads, ALiBi) model of ``--layers`` layers with the full 125,696 vocabulary, bf16,
   full fine-tune (AdamW) and LoRA (W_pack, r 8), one packed row of ``--seq`` tokens per step,
   per implementation: tokens/s, model-FLOPs utilisation (useful FLOPs: 6 x matmul parameters per
   token plus the attention within each conversation, against the bf16 matmul peak measured here)
   and ``torch.cuda.max_memory_allocated``.

Packed rows come from ``../shared/data/medicalgpt_sharegpt_zh_1k.jsonl`` with the real tokenizer when
present, else from conversation lengths drawn like that data's (said in the output).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch

from baichuan_finetune.model.configuration_baichuan import BaichuanConfig
from baichuan_finetune.model.modeling_baichuan import IGNORE_INDEX, BaichuanForCausalLM
from baichuan_finetune.model.specs_baichuan import RELEASED, VOCAB_SIZE
from baichuan_finetune.objectives.attention import IMPLEMENTATIONS, check_available, check_model, kernel_name
from baichuan_finetune.objectives.losses import CausalLMLoss

import common
from common import DATA, TOKENIZER

KERNELS = [name for name in IMPLEMENTATIONS if name != "eager"]
# The released models' widths (every dimension but the layer count, which is --layers).
WIDTHS = {name.upper(): {k: v for k, v in shape.items() if k not in ("vocab_size", "num_hidden_layers")}
          for name, shape in RELEASED.items()}


def availability(name: str, device: str, training: bool, config: BaichuanConfig | None = None) -> str | None:
    """None when ``name`` can run here (and compute `config`'s attention, when given), else the one-line reason."""
    try:
        check_available(name, device, training=training)
        if config is not None:
            check_model(name, config)
    except ValueError as err:
        return str(err)
    return None


# ----- packed rows -----


def conversation_lengths(seq: int, rows: int) -> tuple[list[list[tuple[int, int]]], str]:
    """Per row, (length, prompt length) of each packed conversation, and where they came from."""
    source = "lengths drawn like medicalgpt (../shared absent)"
    pairs: list[tuple[int, int]] = []
    if TOKENIZER.is_file() and DATA.is_file():
        import json

        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
        for line in DATA.read_text(encoding="utf-8").splitlines()[:400]:
            turns = json.loads(line).get("conversations", [])
            sizes = [(len(sp.encode(t.get("value", ""))) + 1, t.get("from") == "gpt") for t in turns]
            n = sum(k for k, _ in sizes)
            prompt = sum(k for k, supervised in sizes if not supervised)  # unsupervised tokens, counted first
            if n > seq:  # truncated to the row: keep the unsupervised share
                n, prompt = seq, prompt * seq // n
            if n > 1:
                pairs.append((n, min(prompt, n - 2)))
        source = f"{DATA.name}, real tokenizer"
    else:
        g = torch.Generator().manual_seed(0)
        for _ in range(400):
            n = int(math.exp(6.2 + 0.8 * float(torch.randn((), generator=g))))
            n = max(16, min(n, seq))
            pairs.append((n, int(n * 0.18)))
    # Best-fit packing into rows of seq tokens (longest first), as the collator does.
    rows_out: list[list[tuple[int, int]]] = []
    free: list[int] = []
    for n, p in sorted(pairs, reverse=True):
        fits = [i for i, f in enumerate(free) if f >= n]
        if fits:
            i = min(fits, key=lambda j: free[j])
            rows_out[i].append((n, p))
            free[i] -= n
        else:
            rows_out.append([(n, p)])
            free.append(seq - n)
    # Rows spread over the whole packing (its first rows hold the longest conversations alone).
    return rows_out[:: max(1, len(rows_out) // rows)][:rows], source


def packed_batch(row: list[tuple[int, int]], seq: int, vocab: int, device: str, seed: int = 0):
    """input_ids, attention_mask (segment ids, 0 padding) and labels (-100 on prompts and boundaries)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, seq), generator=g)
    mask = torch.zeros(1, seq, dtype=torch.long)
    labels = torch.full((1, seq), IGNORE_INDEX)
    pos = 0
    for i, (n, prompt) in enumerate(row, start=1):
        mask[0, pos : pos + n] = i
        labels[0, pos + max(prompt, 1) : pos + n] = ids[0, pos + max(prompt, 1) : pos + n]
        pos += n
    return ids.to(device), mask.to(device), labels.to(device)


# ----- 1. correctness -----


CORRECTNESS_COLUMNS = ["position", "implementation", "out max|d|", "out rel", "grad max|d|", "grad rel", "verdict"]


def correctness(device: str, quick: bool) -> tuple[str, list[list[str]]]:
    """The table's title and rows (CORRECTNESS_COLUMNS)."""
    heads, head_dim, seq = (40, 8, 96) if quick else (40, 128, 1024)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    title = (f"correctness: 2 layers, {heads} heads x {head_dim}, 2 rows of {seq} (one packed row of 3 conversations "
             f"+ padding, one left-padded row), {str(dtype).removeprefix('torch.')} vs fp32 SDPA with the dense mask")
    lines = []
    third = seq // 3
    mask = torch.tensor([[1] * third + [2] * third + [3] * (seq - 2 * third - 7) + [0] * 7,
                         [0] * 11 + [1] * (seq - 11)], device=device)
    for position in ("alibi", "rope"):
        config = BaichuanConfig(vocab_size=1000, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                                num_hidden_layers=2, num_attention_heads=heads, position_embedding=position,
                                model_max_length=seq)
        torch.manual_seed(0)
        reference = BaichuanForCausalLM(config).to(device).float()
        embeds = torch.randn(2, seq, config.hidden_size, device=device)
        probe = torch.randn(2, seq, config.hidden_size, device=device)
        real = (mask != 0)[..., None]

        def run(model, name, run_dtype, backward=True):
            model.set_attn_implementation(kernel_name(name))
            x = embeds.to(run_dtype).requires_grad_(backward)
            with torch.set_grad_enabled(backward):
                out = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
                if not backward:
                    return out.float(), None
                (out.float() * probe * real).sum().backward()
            grads = [x.grad.float()] + [p.grad.float() for p in model.parameters() if p.grad is not None]
            model.zero_grad(set_to_none=True)
            return out.float(), grads

        ref_out, ref_grads = run(reference, "sdpa", torch.float32)
        yardstick = None
        for name in KERNELS + ["eager"]:
            reason = availability(name, device, training=False, config=config)
            if reason is not None:
                lines.append([position, name, "-", "-", "-", "-", f"unavailable: {reason}"])
                continue
            backward = availability(name, device, training=True) is None
            model = copy.deepcopy(reference).to(dtype)
            out, grads = run(model, name, dtype, backward)
            d_out = (out - ref_out).masked_select(real).abs().max().item()
            r_out = d_out / ref_out.abs().max().item()
            if grads is not None:
                d_grad = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
                r_grad = max((g - r).abs().max().item() / r.abs().max().clamp_min(1e-30).item()
                             for g, r in zip(grads, ref_grads))
            if name == "sdpa":
                yardstick = (r_out, r_grad if grads is not None else None)
            if dtype == torch.float32:
                ok = r_out <= 1e-5 and (grads is None or r_grad <= 1e-5)
            else:
                ok = r_out <= 2 * yardstick[0] + 1e-3 and (grads is None or r_grad <= 2 * yardstick[1] + 1e-3)
            grad_cols = [f"{d_grad:.2e}", f"{r_grad:.1e}"] if grads is not None else ["-", "-"]
            note = "" if grads is not None else " (forward only: no backward on this device)"
            lines.append([position, name, f"{d_out:.2e}", f"{r_out:.1e}", *grad_cols, f"{'ok' if ok else 'MISMATCH'}{note}"])
            del model
    return title, lines


# ----- 2. training steps -----


def bf16_matmul_peak(device: str) -> float:
    """Measured bf16 matmul FLOP/s (8192^3, best of 10)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 8192**3 / best


def useful_flops(config: BaichuanConfig, row: list[tuple[int, int]], n_matmul_params: int) -> float:
    """Training FLOPs of one packed row: 6 x matmul parameters per token + attention within each conversation."""
    tokens = sum(n for n, _ in row)
    attended = sum(n * (n + 1) // 2 for n, _ in row)  # keys seen by all queries, causal within a conversation
    return 6 * n_matmul_params * tokens + 12 * config.num_hidden_layers * config.hidden_size * attended


TRAINING_COLUMNS = ["width", "method", "implementation", "tok/s", "MFU", "peak GiB", "x sdpa", "loss", "note"]


def training(device: str, args, rows, peak: float) -> list[list[str]]:
    """The table's rows (TRAINING_COLUMNS)."""
    lines = []
    for width, dims in WIDTHS.items():
        config = BaichuanConfig(vocab_size=VOCAB_SIZE, num_hidden_layers=args.layers, model_max_length=args.seq, **dims)
        for method in ("full", "lora"):
            torch.manual_seed(0)
            with torch.device(device):
                base = BaichuanForCausalLM(config).to(torch.bfloat16)
            n_matmul = sum(p.numel() for n, p in base.named_parameters() if p.dim() == 2 and "embed" not in n)
            model = base
            if method == "lora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                        target_modules=["W_pack"]))
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            sdpa_speed = None
            for name in KERNELS:
                reason = availability(name, device, training=True, config=config)
                if reason is not None:
                    lines.append([width, method, name, "-", "-", "-", "-", "-", f"unavailable: {reason}"])
                    continue
                base.set_attn_implementation(kernel_name(name))
                optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
                loss_fn = CausalLMLoss()
                batches = [packed_batch(rows[i % len(rows)], args.seq, config.vocab_size, device, seed=i)
                           for i in range(args.warmup + args.steps)]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                try:
                    for i, (ids, mask, labels) in enumerate(batches):
                        if i == args.warmup:
                            torch.cuda.synchronize()
                            start = time.perf_counter()
                        loss = model(input_ids=ids, attention_mask=mask, labels=labels, head_loss=loss_fn).loss
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    torch.cuda.synchronize()
                except torch.cuda.OutOfMemoryError:
                    lines.append([width, method, name, "-", "-", "-", "-", "-", "out of memory"])
                    optimizer = None
                    torch.cuda.empty_cache()
                    continue
                seconds = time.perf_counter() - start
                timed = rows_for(rows, args)
                tokens = sum(sum(n for n, _ in r) for r in timed)
                flops = sum(useful_flops(config, r, n_matmul) for r in timed)
                speed = tokens / seconds
                sdpa_speed = speed if name == "sdpa" else sdpa_speed
                ratio = f"{speed / sdpa_speed:.2f}x" if sdpa_speed else "-"
                lines.append([width, method, name, f"{speed:.0f}", f"{flops / seconds / peak:.1%}",
                              f"{torch.cuda.max_memory_allocated() / 2**30:.1f}", ratio, f"{loss.item():.3f}", ""])
                del optimizer
                torch.cuda.empty_cache()
            del model, base
            torch.cuda.empty_cache()
    return lines


def rows_for(rows, args):
    return [rows[i % len(rows)] for i in range(args.warmup, args.warmup + args.steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small correctness check only")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (FlexAttention compiles in them)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per implementation")
    common.add_json_argument(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here; run with --device cpu --quick for the correctness part")
    report = common.Report(args, device=args.device)
    report.table(["implementation", "availability"],
                 [[name, availability(name, args.device, training=True) or "available"] for name in IMPLEMENTATIONS])
    title, rows = correctness(args.device, args.quick)
    report.table(CORRECTNESS_COLUMNS, rows, title=title)
    if args.quick or args.device == "cpu":
        report.line(f"\n(training steps skipped: {'--quick' if args.quick else 'CPU'}; "
                    f"{time.perf_counter() - report.started:.0f} s)")
        report.finish()
        return
    peak = bf16_matmul_peak(args.device)
    rows, source = conversation_lengths(args.seq, args.warmup + args.steps)
    fill = sum(sum(n for n, _ in r) for r in rows) / (len(rows) * args.seq)
    report.table(TRAINING_COLUMNS, training(args.device, args, rows, peak),
                 title=f"training: {args.layers} layers, vocab {VOCAB_SIZE}, bf16, one packed row of {args.seq} tokens "
                       f"per step ({source}; rows {fill:.1%} real tokens), {args.warmup} warm-up + {args.steps} timed "
                       f"steps; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s")
    report.line(f"\ntotal {time.perf_counter() - report.started:.0f} s")
    report.finish(bf16_matmul_peak_flops=peak, packed_rows_source=source)

if __name__ == "__main__":
    main()
