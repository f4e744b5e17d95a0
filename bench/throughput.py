"""Throughput and MACs of DeiT-S vs its token-reduced variants (same process, same batch).

CPU: fp32, batch 32. CUDA (when available): bf16 autocast, batch 256. Models are interleaved per
repeat (so machine-load drift hits all of them alike); we report the median img/s over repeats.

    python bench/throughput.py                 # CPU
    python bench/throughput.py --device cuda   # GPU
Writes bench/results/throughput-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import effvision

VARIANTS = {
    "deit_small_patch16_224": "deit_small_patch16_224",
    "ppt (r=50, layers 3/6/9, tau=7e-5)": "ppt_deit_small_patch16_224",
    "tome (r=13)": "tome_deit_small_patch16_224",
    "topk (keep 0.7, layers 3/6/9)": "topk_deit_small_patch16_224",
}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def time_batch(model, images, device: str, dtype: torch.dtype | None) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        model(images)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 256 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per model (default 7 CPU, 30 CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = args.device
    batch = args.batch or (256 if device == "cuda" else 32)
    repeats = args.repeats or (30 if device == "cuda" else 7)
    dtype = torch.bfloat16 if device == "cuda" else None

    torch.manual_seed(0)
    models = {label: timm.create_model(name).eval().to(device) for label, name in VARIANTS.items()}
    images = torch.randn(batch, 3, 224, 224, device=device)
    for model in models.values():
        for _ in range(args.warmup):
            time_batch(model, images, device, dtype)
    seconds = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            seconds[label].append(time_batch(model, images, device, dtype))

    base_label = next(iter(models))
    base_ips = batch / statistics.median(seconds[base_label])
    rows = []
    for label, model in models.items():
        info = effvision.reduction_info(model)
        ips = batch / statistics.median(seconds[label])
        rows.append(
            {
                "model": label,
                "timm_name": VARIANTS[label],
                "gmacs": round(info["gmacs"], 3),
                "macs_ratio": round(info["macs_ratio"], 3),
                "tokens_per_block": info["tokens"],
                "img_per_s": round(ips, 2),
                "speedup": round(ips / base_ips, 3),
                "seconds_per_batch": [round(s, 4) for s in seconds[label]],
            }
        )
    result = {
        "device": device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "dtype": "bf16-autocast" if dtype else "fp32",
        "batch": batch,
        "repeats": repeats,
        "weights": "random init (speed and MACs do not depend on weights)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"throughput-{result['device']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Throughput on {result['device']} ({result['dtype']}, batch {batch}, median of {repeats})",
        "",
        f"torch {result['torch']}, timm {result['timm']}; command: `{result['command']}`",
        "",
        "| model | GMACs | MACs ratio | img/s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['gmacs']:.2f} | {r['macs_ratio']:.2f} | {r['img_per_s']:.1f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
