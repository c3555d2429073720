"""Pre-training step throughput and model FLOP utilisation (MFU) against the measured matmul peak.

FLOPs of one step (forward + backward) are counted by ``torch.utils.flop_counter`` on the real
step (matmuls, convolutions, attention), not estimated by hand. The peak is the best fp32 (CPU)
or bf16 (CUDA) throughput of a large square matmul measured in the same run. Steps include the
AdamW update. Prints a table, then one JSON line.

    python bench/train_step.py                 # CPU, fp32
    python bench/train_step.py --device cuda   # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mapex_core.model import MapexConfig, MapexModel


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best observed FLOP/s of an ``n x n`` matmul."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chip", type=int, default=64)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--experts-per-modality", type=int, default=4)
    ap.add_argument("--decoder-dim", type=int, default=256)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    amp = dev.type == "cuda"
    torch.manual_seed(0)

    cfg = MapexConfig(modalities=["s1", "s2"], img_size=args.chip, patch_size=8, dim=args.dim,
                      depth=args.depth, heads=args.heads, moe_every=2,
                      experts_per_modality=args.experts_per_modality, top_k=2,
                      mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim, decoder_depth=2,
                      decoder_heads=8)
    model = MapexModel(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, c = args.batch_size, args.chip
    batch = {"s1": torch.randn(b, 2, c, c, device=dev), "s2": torch.randn(b, 12, c, c, device=dev)}
    gen = torch.Generator(device=dev).manual_seed(0)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(batch, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()

    peak_runs, times = [], []
    for r in range(args.warmup + args.steps):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        if r >= args.warmup:
            times.append(time.perf_counter() - t0)
        if r % 3 == 0:  # interleave peak measurements with the steps (same machine state)
            peak_runs.append(matmul_peak(dev, torch.bfloat16 if amp else torch.float32,
                                         4096 if amp else 2048, 3))
    step_s = statistics.median(times)
    peak = max(peak_runs)
    tokens = b * 2 * (c // 8) ** 2  # input tokens (both modalities) per step
    result = {
        "device": str(dev), "dtype": "bf16-autocast" if amp else "fp32",
        "params": model.num_parameters(), "batch_size": b, "tokens_per_step": tokens,
        "step_ms": round(step_s * 1e3, 1), "tokens_per_s": round(tokens / step_s, 1),
        "samples_per_s": round(b / step_s, 2),
        "model_gflop_per_step": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / step_s / 1e9, 1),
        "peak_matmul_gflops": round(peak / 1e9, 1),
        "mfu": round(flops / step_s / peak, 3),
    }
    print(f"MAPEX pre-training step on {dev}: {result['params'] / 1e6:.1f} M params, batch {b}, "
          f"{tokens} tokens/step ({torch.get_num_threads()} threads)")
    for k in ("step_ms", "tokens_per_s", "model_gflop_per_step", "achieved_gflops", "peak_matmul_gflops", "mfu"):
        print(f"  {k:22s} {result[k]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
