"""onnxruntime (CPU) vs PyTorch eager (CPU) throughput for DeiT-S and PPT-DeiT-S (random weights).

Both runtimes get the same thread count and the same fp32 inputs; each measurement is the median of
``--repeats`` timed runs of ``--iters`` batches after warm-up. Results: bench/results/onnx-cpu.json + .md.

    OMP_NUM_THREADS=2 .venv/bin/python bench/onnx.py            # the committed results
    .venv/bin/python bench/onnx.py --models deit_tiny_patch16_224 --iters 3 --out /tmp/onnx   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and "onnx.py" would shadow the onnx package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import onnxruntime  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from effvision.export import OrtModel, check_onnx, export_onnx  # noqa: E402

import effvision  # noqa: E402 - registers ppt_* names

DEFAULT_MODELS = ("deit_small_patch16_224", "ppt_deit_small_patch16_224")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def interleaved_images_per_second(runners: dict, batch: torch.Tensor, iters: int, repeats: int) -> dict:
    """Median img/s per runner; the runners alternate within each repeat, so on a shared machine they
    see the same background load."""
    for run in runners.values():
        for _ in range(2):
            run(batch)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(iters):
                run(batch)
            rates[name].append(iters * batch.shape[0] / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def measure(name: str, batch_size: int, threads: int, iters: int, repeats: int, workdir: Path) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    path = export_onnx(model, workdir / f"{name}.onnx", (1, 3, 224, 224))
    batch = torch.randn(batch_size, 3, 224, 224)
    parity = check_onnx(model, path, [batch])
    ort_model = OrtModel(path, threads=threads)
    with torch.inference_mode():
        rates = interleaved_images_per_second({"eager": model, "ort": ort_model}, batch, iters, repeats)
    eager, ort = rates["eager"], rates["ort"]
    info = effvision.reduction_info(model) if name.startswith(("ppt_", "tome_", "topk_")) else None
    return {
        "model": name,
        "batch": batch_size,
        "eager_img_per_s": eager,
        "ort_img_per_s": ort,
        "ort_over_eager": ort / eager,
        "max_abs_diff": parity["max_abs_diff"],
        "top1_agreement": parity["top1_agreement"],
        "gmacs": info["gmacs"] if info else None,
    }


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# ONNX Runtime vs PyTorch eager, CPU",
        "",
        f"Machine: {results['machine']}. {results['note']}",
        f"torch {results['torch']}, onnxruntime {results['onnxruntime']}, {results['threads']} threads for both, "
        f"fp32, batch {results['rows'][0]['batch']}, random weights, TorchScript exporter opset 18.",
        "",
        f"Command: `{results['command']}`",
        "",
        "| model | eager img/s | ORT img/s | ORT / eager | max abs diff | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['model']} | {row['eager_img_per_s']:.1f} | {row['ort_img_per_s']:.1f} | "
            f"{row['ort_over_eager']:.2f}x | {row['max_abs_diff']:.2g} | {row['top1_agreement']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/onnx-cpu", help="output path without extension")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            measure(name, args.batch, args.threads, args.iters, args.repeats, Path(workdir)) for name in args.models
        ]
    results = {
        "machine": f"{_cpu_name()}, {torch.get_num_threads()} threads",
        "note": "Shared 2-core CPU VM with other engineers' jobs running (load average "
        f"{os.getloadavg()[0]:.1f} at the end): absolute numbers are low and noisy; eager and ORT runs "
        "alternate, so the ratio is the meaningful number.",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "command": "OMP_NUM_THREADS=2 .venv/bin/python bench/onnx.py "
        + " ".join(f"--{k} {v}" for k, v in (("batch", args.batch), ("iters", args.iters), ("repeats", args.repeats))),
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
