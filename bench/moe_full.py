"""A MoE layer pruned down to top_k experts: the all-experts path against the sorted dispatch.

One ``MoELayer`` with exactly ``top_k`` experts (what ``prune.keep_per_layer: top_k`` leaves), the same
weights and tokens for both: ``all_experts_when_full = True`` (every token to every expert, one
dense FFN of width ``E * H`` scaled by the gates: no top-k, no sort, no host sync) and ``False``
(top-k selection of all ``k`` experts and the sorted dispatch). Forward passes (inference) and
forward+backward, repeats interleaved (all, sorted, all, ...) so machine noise hits both alike;
medians reported. Prints a table, then one JSON line.

    python bench/moe_full.py                                  # demo sizes: dim 128, 2048 tokens
    python bench/moe_full.py --dim 384 --hidden 1536 --tokens 8192
    python bench/moe_full.py --device cuda                    # GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mapex_core.model import MoELayer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per call (demo: batch 32 x 64 patches)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    k = args.top_k
    layer = MoELayer(args.dim, args.hidden, num_experts=k, top_k=k, num_modalities=1).to(dev)
    with torch.no_grad():
        layer.router.normal_(std=0.5)
    x = torch.randn(args.tokens, args.dim, device=dev)
    ids = torch.zeros(args.tokens, dtype=torch.long, device=dev)

    def forward(all_path: bool, backward: bool) -> torch.Tensor:
        layer.all_experts_when_full = all_path
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            if not backward:
                with torch.inference_mode():
                    return layer(x, ids)[0]
            xx = x.detach().requires_grad_(True)
            y, aux = layer(xx, ids)
            (y.float().sum() + aux).backward()
            return y.detach()

    kinds = [("all", True), ("sorted", False)]
    times: dict[str, list[float]] = {}
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        for r in range(args.warmup + args.repeats):
            for name, all_path in kinds:
                sync(dev)
                t0 = time.perf_counter()
                forward(all_path, backward)
                sync(dev)
                if r >= args.warmup:
                    times.setdefault(f"{name} {mode}", []).append((time.perf_counter() - t0) * 1e3)
    y_all = forward(True, False).float()
    y_sorted = forward(False, False).float()

    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"MoELayer with E = top_k = {k}: N={args.tokens} D={args.dim} H={args.hidden} "
          f"{str(dtype).replace('torch.', '')} on {dev} ({torch.get_num_threads()} threads), {args.repeats} repeats")
    print(f"{'path':16s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}")
    for key in times:
        print(f"{key:16s} {med[key]:10.3f} {min(times[key]):8.3f} {max(times[key]):8.3f}")
    print(json.dumps({
        "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "tokens": args.tokens, "dim": args.dim,
        "hidden": args.hidden, "top_k": k, "threads": torch.get_num_threads(),
        **{key.replace(" ", "_").replace("+", "_") + "_ms": round(v, 3) for key, v in med.items()},
        "sorted_vs_all_fwd": round(med["sorted fwd"] / med["all fwd"], 3),
        "sorted_vs_all_fwd_bwd": round(med["sorted fwd+bwd"] / med["all fwd+bwd"], 3),
        "max_abs_diff": float((y_all - y_sorted).abs().max()),
    }))


if __name__ == "__main__":
    main()
