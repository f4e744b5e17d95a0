"""DINOv2 ViT-S/14 with ToMe / PPT: token schedule, GMACs and CPU speed-up (random weights).

    python bench/dinov2.py [--img-size 224] [--batch 8] [--repeats 5]
Writes bench/results/dinov2-cpu.json and .md. Models are interleaved per repeat; median img/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import effvision

VARIANTS = {
    "vit_small_patch14_dinov2": "vit_small_patch14_dinov2",
    "tome (default r, scaled to the patches)": "tome_vit_small_patch14_dinov2",
    "ppt (default r, layers 3/6/9, tau=7e-5)": "ppt_vit_small_patch14_dinov2",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {label: timm.create_model(name, img_size=args.img_size).eval() for label, name in VARIANTS.items()}
    # analytic MACs at the DINOv2 default size as well (518 px, 1370 tokens)
    at_518 = {label: effvision.reduction_info(timm.create_model(name)) for label, name in VARIANTS.items()}
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    times = {label: [] for label in models}
    with torch.no_grad():
        for model in models.values():
            model(images)
        for _ in range(args.repeats):
            for label, model in models.items():
                start = time.perf_counter()
                model(images)
                times[label].append(time.perf_counter() - start)
    base_label = next(iter(models))
    rows = []
    for label, model in models.items():
        info = effvision.reduction_info(model)
        throughput = args.batch / statistics.median(times[label])
        rows.append({
            "variant": label,
            "tokens": info["tokens"],
            "tokens_after": info["tokens_after"],
            "gmacs": info["gmacs"],
            "gmacs_518": at_518[label]["gmacs"],
            "tokens_518": at_518[label]["tokens"],
            "img_per_s": throughput,
        })
    base = rows[0]["img_per_s"]
    for row in rows:
        row["speedup"] = row["img_per_s"] / base
    machine = f"cpu-{os.cpu_count()}core ({platform.processor() or platform.machine()}), shared with other jobs"
    result = {"machine": machine, "load_average_1min": os.getloadavg()[0],
              "img_size": args.img_size, "batch": args.batch, "repeats": args.repeats,
              "dtype": "fp32", "torch_threads": torch.get_num_threads(), "weights": "random", "rows": rows,
              "base": base_label}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dinov2-cpu.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# DINOv2 ViT-S/14 with token reduction, CPU ({machine})",
        "",
        f"fp32, batch {args.batch}, {args.img_size} px, median of {args.repeats} interleaved repeats, random weights.",
        "Timings are NOISY: a 2-core CPU shared with other jobs (1-min load average at the end: "
        f"{os.getloadavg()[0]:.1f}). GMACs are analytic (effvision.reduction_info).",
        "",
        f"| variant | tokens into blocks 0/3/6/9/11 at {args.img_size} px | GMACs | img/s | speed-up | "
        "GMACs at 518 px | tokens at 518 px (0/3/6/9/11) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pick = lambda tokens: "/".join(str(tokens[i]) for i in (0, 3, 6, 9, 11))  # noqa: E731
        lines.append(
            f"| {row['variant']} | {pick(row['tokens'])} (last MLP {row['tokens_after'][-1]}) | {row['gmacs']:.2f} | "
            f"{row['img_per_s']:.1f} | {row['speedup']:.2f}x | {row['gmacs_518']:.1f} | {pick(row['tokens_518'])} |"
        )
    (args.out / "dinov2-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
