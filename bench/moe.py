"""MoELayer forward+backward: sorted dispatch vs the loop reference vs a dense FFN.

The dense FFN has the same active parameters per token (hidden = top_k x H). Repeats are
interleaved (sorted, loop, dense, sorted, ...) so machine noise hits all three alike; the
median is reported. Prints a table, then one JSON line.

    python bench/moe.py                      # CPU, fp32
    python bench/moe.py --device cuda        # GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mapex_core.model import FeedForward, MoELayer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--modalities", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)

    moe = MoELayer(args.dim, args.hidden, args.experts, args.top_k, args.modalities).to(dev)
    with torch.no_grad():
        moe.router.normal_(std=0.5)  # routing decided by the tokens, not only by the bias
    dense = FeedForward(args.dim, args.top_k * args.hidden).to(dev)
    x = torch.randn(args.tokens, args.dim, device=dev)
    ids = torch.arange(args.tokens, device=dev) % args.modalities

    def step(kind: str) -> torch.Tensor:
        xx = x.detach().requires_grad_(True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            if kind == "dense":
                y = dense(xx)
                loss = y.float().sum()
            else:
                moe.impl = kind
                y, aux = moe(xx, ids)
                loss = y.float().sum() + aux
        loss.backward()
        return y.detach()

    kinds = ("sorted", "loop", "dense")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.warmup + args.repeats):
        for k in kinds:
            sync(dev)
            t0 = time.perf_counter()
            step(k)
            sync(dev)
            if r >= args.warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)

    moe.impl = "sorted"
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        ys = moe(x, ids)[0].float()
        moe.impl = "loop"
        yl = moe(x, ids)[0].float()
    counts = torch.bincount(moe.route(x, ids)[1].reshape(-1), minlength=args.experts).tolist()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MoELayer fwd+bwd  N={args.tokens} D={args.dim} H={args.hidden} E={args.experts} "
          f"top_k={args.top_k} {str(dtype).replace('torch.', '')} on {dev} ({torch.get_num_threads()} threads)")
    print(f"token-slots per expert: {counts}")
    print(f"{'impl':8s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}")
    for k in kinds:
        print(f"{k:8s} {med[k]:10.1f} {min(times[k]):8.1f} {max(times[k]):8.1f}")
    result = {
        "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
        "sorted_ms": round(med["sorted"], 2), "loop_ms": round(med["loop"], 2), "dense_ms": round(med["dense"], 2),
        "sorted_vs_dense": round(med["sorted"] / med["dense"], 3),
        "loop_vs_sorted": round(med["loop"] / med["sorted"], 3),
        "max_abs_diff": float((ys - yl).abs().max()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
