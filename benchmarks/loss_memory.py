"""Peak memory of the chunked NormHead loss (losses.CausalLMLoss) against the naive full-logits loss.

Each mode runs in its own process; the figure is the growth of peak RSS during one forward and
backward of the loss, above the memory held before it (hidden states and head weight).

Usage: python benchmarks/loss_memory.py [--seq 4096] [--vocab 125696] [--hidden 128 4096] [--json PATH]
       python benchmarks/loss_memory.py --speed [--seq 2048] [--hidden 128] [--unsupervised 0.18 0.5] [--json PATH]
"""

import argparse
import json

import torch
import torch.nn.functional as F

import common


def run_mode(mode: str, seq: int, vocab: int, hidden: int) -> dict:
    from baichuan_finetune.objectives.losses import CausalLMLoss
    from baichuan_finetune.model.modeling_baichuan import NormHead

    torch.manual_seed(0)
    head = NormHead(hidden, vocab)
    torch.nn.init.normal_(head.weight, std=0.02)
    h = torch.randn(seq, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (seq,))
    labels[: seq // 4] = -100
    z = 1e-4
    baseline = common.rss_bytes()
    if mode == "naive":
        logits = (h @ F.normalize(head.weight, dim=-1).T).float()
        loss = F.cross_entropy(logits, labels, ignore_index=-100) + z * logits.max(-1).values.pow(2).mean()
    else:
        loss = head(h, labels, CausalLMLoss(z_loss_weight=z))
    loss.backward()
    peak = common.peak_rss_bytes()
    return {
        "loss": loss.item(),
        "grad_h_sum": h.grad.double().abs().sum().item(),
        "grad_w_sum": head.weight.grad.double().abs().sum().item(),
        "peak_growth_bytes": peak - baseline,
    }


def head_speed(report, seq: int, vocab: int, hidden: int, shares: list[float], repeats: int = 2) -> list:
    """Forward+backward time of CausalLMLoss (z-loss 0: supervised rows only) against the same
    NormHeadLoss over every token, interleaved, best of ``repeats``."""
    import time

    from baichuan_finetune.objectives.losses import CausalLMLoss, NormHeadLoss

    report.line(f"head loss over {seq} tokens, hidden {hidden}, vocab {vocab}, float32, CPU "
                f"({torch.get_num_threads()} threads); best of {repeats}")
    rows = []
    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    for share in shares:
        h = torch.randn(seq, hidden, requires_grad=True)
        labels = torch.randint(0, vocab, (seq,))
        labels[torch.randperm(seq)[: int(share * seq)]] = -100
        times = {"all tokens": [], "supervised only": []}
        for _ in range(repeats):
            for name, fn in (("all tokens", lambda: NormHeadLoss.apply(h, weight, labels, 0.0, 256)),
                             ("supervised only", lambda: CausalLMLoss()(h, weight, labels))):
                start = time.perf_counter()
                fn().backward()
                times[name].append(time.perf_counter() - start)
                h.grad = weight.grad = None
        full, sup = min(times["all tokens"]), min(times["supervised only"])
        rows.append([f"{share:.0%}", f"{full:.2f}", f"{sup:.2f}", f"{full / sup:.2f}x", f"{1 / (1 - share):.2f}x"])
    report.table(["unsupervised", "all tokens s", "supervised only s", "speed-up", "ideal"], rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=125696)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--speed", action="store_true",
                        help="instead: time the head over all tokens vs supervised tokens only (z-loss 0)")
    parser.add_argument("--unsupervised", type=float, nargs="+", default=[0.18, 0.5],
                        help="with --speed: shares of tokens whose label is -100")
    parser.add_argument("--_mode", help=argparse.SUPPRESS)
    common.add_json_argument(parser)
    args = parser.parse_args()
    if args._mode:
        print(json.dumps(run_mode(args._mode, args.seq, args.vocab, args.hidden[0])))
        return
    report = common.Report(args)
    if args.speed:
        head_speed(report, args.seq, args.vocab, args.hidden[0], args.unsupervised)
        report.finish()
        return
    report.line(f"loss over {args.seq} tokens, vocab {args.vocab}, float32, CPU; peak RSS growth during forward+backward")
    rows, raw = [], {}
    for hidden in args.hidden:
        results = {mode: common.run_child(__file__, ["--seq", str(args.seq), "--vocab", str(args.vocab),
                                                     "--hidden", str(hidden), "--_mode", mode])
                   for mode in ("naive", "chunked")}
        n, c = results["naive"], results["chunked"]
        ratio = c["peak_growth_bytes"] / n["peak_growth_bytes"]
        rows.append([hidden, f"{n['peak_growth_bytes'] / 2**30:.2f}", f"{c['peak_growth_bytes'] / 2**30:.2f}",
                     f"{ratio:.3f}", f"{abs(n['loss'] - c['loss']):.2e}",
                     f"{abs(n['grad_h_sum'] - c['grad_h_sum']) / n['grad_h_sum']:.1e}",
                     f"{abs(n['grad_w_sum'] - c['grad_w_sum']) / n['grad_w_sum']:.1e}"])
        raw[hidden] = results
    report.table(["hidden", "naive GiB", "chunked GiB", "ratio", "abs loss diff", "grad sum rel diff h",
                  "grad sum rel diff w"], rows)
    report.finish(results=raw)


if __name__ == "__main__":
    main()
