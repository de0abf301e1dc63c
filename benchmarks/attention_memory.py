"""Peak memory of one attention forward+backward on a packed ALiBi row, before and after the float32 slopes.

    python benchmarks/attention_memory.py [--seq 4096] [--heads 40] [--head_dim 128] [--dtype bfloat16] [--json PATH]

Each mode runs in its own process on CPU; the figure is the growth of peak RSS above what was held
before (q, k, v). One packed row of ``--seq`` tokens holding conversations of 300-1500 tokens, ALiBi
with the 13B slopes, SDPA with the model's additive bias, then ``out.sum().backward()``:

- ``before``: the bias as the model built it until now, ``bf16(slope) * bf16(j - i)`` over all heads
  at once, then masked;
- ``after``: ``modeling_baichuan.attention_bias`` (float32 product, one head at a time, cast once);
- ``bias_before`` / ``bias_after``: building that bias alone, no attention.

The L x L terms (bias, scores, probabilities and their gradients) do not depend on the head size,
so ``--head_dim 16`` gives the same picture much faster on a CPU without bf16 matrix units.

It also prints the bytes of the bias and of the boolean mask, which FlexAttention and the
FlashAttention varlen kernel never create (they take the sequence boundaries and slopes).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

import common


def packed_segments(seq: int) -> torch.Tensor:
    """Segment ids of one packed row: conversations of 300..1500 tokens, a little padding at the end."""
    g = torch.Generator().manual_seed(0)
    ids, n, pos = [], 1, 0
    while pos < seq - 64:
        length = min(int(torch.randint(300, 1500, (1,), generator=g)), seq - 64 - pos)
        ids += [n] * length
        n, pos = n + 1, pos + length
    return torch.tensor([ids + [0] * (seq - len(ids))])


def old_bias(segments, seq, dtype, slopes):
    """The former attention_bias for ALiBi: slope rounded to the compute dtype first, all heads at once."""
    from baichuan_finetune.model.modeling_baichuan import attention_bias

    allowed = attention_bias(segments, seq, seq, dtype, torch.device("cpu"), None)[:, 0]
    k_idx = torch.arange(seq)
    distance = (k_idx[None, :] - k_idx[:, None]).to(dtype)
    bias = slopes.to(dtype)[:, None, None] * distance
    return bias[None].masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def run_mode(mode: str, seq: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    from baichuan_finetune.model.modeling_baichuan import alibi_slopes, attention_bias

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, head_dim, dtype=dtype).requires_grad_() for _ in range(3))
    segments = packed_segments(seq)
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32)
    baseline = common.rss_bytes()
    start = time.perf_counter()
    if mode in ("before", "bias_before"):
        bias = old_bias(segments, seq, dtype, slopes)
    else:
        bias = attention_bias(segments, seq, seq, dtype, torch.device("cpu"), slopes)
    if not mode.startswith("bias_"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.float().sum().backward()
    peak = common.peak_rss_bytes()
    return {"peak_growth_bytes": peak - baseline, "seconds": time.perf_counter() - start,
            "bias_bytes": bias.numel() * bias.element_size(), "conversations": int(segments.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--modes", default="bias_before,bias_after,before,after")
    parser.add_argument("--_mode", help=argparse.SUPPRESS)
    common.add_json_argument(parser)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args._mode:
        print(json.dumps(run_mode(args._mode, args.seq, args.heads, args.head_dim, dtype)))
        return
    report = common.Report(args)
    report.line(f"one packed row of {args.seq} tokens, {args.heads} heads x {args.head_dim}, ALiBi, {args.dtype}, "
                f"CPU SDPA forward+backward; peak RSS growth above q, k, v")
    results = {}
    for mode in args.modes.split(","):
        results[mode] = common.run_child(__file__, ["--seq", str(args.seq), "--heads", str(args.heads),
                                                    "--head_dim", str(args.head_dim), "--dtype", args.dtype,
                                                    "--_mode", mode])
    report.table(["mode", "peak growth GiB", "seconds", "conversations"],
                 [[mode, f"{r['peak_growth_bytes'] / 2**30:.2f}", f"{r['seconds']:.1f}", r["conversations"]]
                  for mode, r in results.items()])
    item = torch.finfo(dtype).bits // 8
    bias = args.heads * args.seq * args.seq * item
    mask = args.seq * args.seq
    report.line()
    report.line(f"per packed row, never created by flex_attention / flash_attention_2: the ALiBi bias "
                f"[1, {args.heads}, {args.seq}, {args.seq}] {args.dtype} = {bias / 2**30:.2f} GiB ({bias:,} bytes); "
                f"for RoPE the bool mask [1, 1, {args.seq}, {args.seq}] = {mask / 2**20:.0f} MiB")
    report.finish(results=results)

if __name__ == "__main__":
    main()
