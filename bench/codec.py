"""Codec cost vs image size: encode/decode time and peak memory of MambaIC and compressai baselines.

Models: MambaIC ``lite`` (CPU) and ``paper`` (CUDA only, when available), compressai ``mbt2018_mean``
and ``cheng2020_anchor`` (quality 3). All with random-init weights: timing does not depend on training,
but the entropy coder's work does depend on the rate, so absolute bpp of random models is meaningless.
Sizes are squares 256^2 .. 2048^2; sizes whose estimated CPU time exceeds ``--max-seconds`` are skipped
and listed. Fits ``time = a * pixels^k`` per model (k = 1 means linear cost).

    OMP_NUM_THREADS=2 .venv/bin/python bench/codec.py --sizes 256 512 1024 --out bench/results/codec-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch


class PeakMemory:
    """Peak resident memory (CPU, sampled from /proc every 5 ms) or peak CUDA allocation."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self._rss()
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss()) - self.base


def build(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("mambaic-"):
        from effvision.codecs.mambaic import MambaIC

        model = MambaIC(name.removeprefix("mambaic-"))
    else:
        from compressai.zoo import cheng2020_anchor, mbt2018_mean

        model = {"mbt2018_mean": mbt2018_mean, "cheng2020_anchor": cheng2020_anchor}[name](quality=3, pretrained=False)
    model = model.to(device).eval()
    model.update(force=True)
    return model


@torch.no_grad()
def measure(model: torch.nn.Module, side: int, device: str) -> dict:
    x = torch.rand(1, 3, side, side, device=device)
    with PeakMemory(device) as encode_memory:
        started = time.perf_counter()
        coded = model.compress(x)
        if device == "cuda":
            torch.cuda.synchronize()
        encode_s = time.perf_counter() - started
    with PeakMemory(device) as decode_memory:
        started = time.perf_counter()
        model.decompress(coded["strings"], coded["shape"])
        if device == "cuda":
            torch.cuda.synchronize()
        decode_s = time.perf_counter() - started
    return {
        "side": side, "pixels": side * side, "encode_s": encode_s, "decode_s": decode_s,
        "encode_peak_mib": encode_memory.peak / 2**20, "decode_peak_mib": decode_memory.peak / 2**20,
    }


def fit_exponent(rows: list[dict], key: str) -> float | None:
    """k in time = a * pixels^k (least squares in log-log); None with fewer than 2 sizes."""
    if len(rows) < 2:
        return None
    return float(np.polyfit(np.log([r["pixels"] for r in rows]), np.log([r[key] for r in rows]), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--models", nargs="+", default=["mambaic-lite", "mambaic-paper", "mbt2018_mean",
                                                         "cheng2020_anchor"])
    parser.add_argument("--max-seconds", type=float, default=120.0, help="skip sizes predicted to take longer")
    parser.add_argument("--repeats", type=int, default=2, help="runs per size; the fastest is reported")
    parser.add_argument("--out", default="bench/results/codec-cpu")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                   f"torch threads {torch.get_num_threads()}, CUDA: {torch.cuda.get_device_name() if cuda else 'none'}",
        "note": "random-init weights (timing only); fastest of --repeats runs; CPU peak = rise of the "
                "process RSS sampled every 5 ms (allocator reuse can hide memory); the CPU machine is shared "
                "with other jobs",
        "models": {}, "skipped": [],
    }
    for name in args.models:
        device = "cuda" if name == "mambaic-paper" else "cpu"
        if device == "cuda" and not cuda:
            report["skipped"].append(f"{name}: needs CUDA (none available)")
            continue
        model = build(name, device)
        measure(model, 64, device)  # warm-up
        rows: list[dict] = []
        for side in sorted(args.sizes):
            if rows:
                predicted = (rows[-1]["encode_s"] + rows[-1]["decode_s"]) * side**2 / rows[-1]["pixels"]
                if predicted > args.max_seconds:
                    report["skipped"].append(f"{name} {side}^2: predicted {predicted:.0f} s > {args.max_seconds:.0f} s")
                    continue
            runs = [measure(model, side, device) for _ in range(args.repeats)]
            rows.append(min(runs, key=lambda r: r["encode_s"] + r["decode_s"]))
            print(name, rows[-1], flush=True)
        report["models"][name] = {
            "device": device, "rows": rows,
            "encode_exponent": fit_exponent(rows, "encode_s"), "decode_exponent": fit_exponent(rows, "decode_s"),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# Codec cost vs pixels\n\nMachine: {report['machine']}. {report['note']}.\n",
             "| model | device | side | encode (s) | decode (s) | enc peak (MiB) | dec peak (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, data in report["models"].items():
        for r in data["rows"]:
            lines.append(f"| {name} | {data['device']} | {r['side']} | {r['encode_s']:.2f} | {r['decode_s']:.2f} | "
                         f"{r['encode_peak_mib']:.0f} | {r['decode_peak_mib']:.0f} |")
    lines.append("\nFitted exponent k in time ~ pixels^k (1 = linear):\n")
    for name, data in report["models"].items():
        lines.append(f"- {name}: encode k = {data['encode_exponent']}, decode k = {data['decode_exponent']}")
    if report["skipped"]:
        lines.append("\nSkipped: " + "; ".join(report["skipped"]))
    lines.append("\nReproduce: `" + "python bench/codec.py " + " ".join(os.sys.argv[1:]) + "`")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
