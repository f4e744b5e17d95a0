"""Peak memory and time of tiled vs untiled coding of a large photo, through the CLI, under ``/usr/bin/time -v``.

Each measurement is its own process (this script with ``--run encode|decode``, which loads the shipped codec and
calls ``effvision.codecs.imagefile.encode_image`` / ``decode_image``, as the CLI does), so its maximum resident
set size is exactly that operation's. The untiled path is the same code with one tile as large as the image (what
version-1 files did), the codec's tile limit lifted for the measurement.

    python bench/codec_tiling.py --codecs mambaic vqgan

The photo is a mosaic of scikit-image's photos scaled to 4000 x 3000 (12 MP). Writes
``bench/results/codec-tiling-cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def mosaic(width: int, height: int) -> Image.Image:
    """Real photos (scikit-image's astronaut, chelsea, coffee, rocket) tiled and scaled to width x height."""
    from skimage import data

    photos = [
        Image.fromarray(p).convert("RGB") for p in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())
    ]
    half_w, half_h = width // 2, height // 2
    canvas = Image.new("RGB", (width, height))
    for index, photo in enumerate(photos):
        box = ((index % 2) * half_w, (index // 2) * half_h)
        canvas.paste(
            photo.resize(
                (width - half_w if index % 2 else half_w, height - half_h if index // 2 else half_h),
                Image.Resampling.BICUBIC,
            ),
            box,
        )
    return canvas


def run_one(operation: str, codec_name: str, tile: int, source: str, target: str) -> None:
    """One encode or decode with the shipped codec (``tile`` 0: the codec's default tiles)."""
    import torch

    from effvision.codecs.base import load_codec
    from effvision.codecs.container import parse
    from effvision.codecs.imagefile import decode_image, encode_image

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if operation == "encode":
        codec = load_codec(codec_name, device="cpu")
        if tile:
            codec.max_tile_pixels = tile * tile
        container = encode_image(codec, Image.open(source), tile_size=tile or None)
        Path(target).write_bytes(container.to_bytes())
    else:
        container = parse(Path(source).read_bytes())
        codec = load_codec(container.codec, device="cpu", config_id=container.config_id)
        codec.max_tile_pixels = max(codec.max_tile_pixels, container.tile_width * container.tile_height)
        decode_image(container, codec, max_pixels=1 << 30).save(target)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(command: list[str], env: dict) -> dict:
    """Run under /usr/bin/time -v; returns wall seconds, peak RSS (MB) and the exit status."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    own_output = [
        line
        for line in result.stderr.split("\tCommand being timed")[0].strip().splitlines()
        if not line.startswith("Command exited with non-zero status")
    ]
    return {
        "status": result.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
        "error": (own_output[-1] if own_output else f"exit status {result.returncode}") if result.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--codecs", nargs="+", default=["mambaic", "vqgan"])
    parser.add_argument("--modes", nargs="+", default=["tiled", "untiled"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "codec-tiling-cpu"))
    parser.add_argument(
        "--update", action="store_true", help="keep the rows of --out.json for (codec, mode) pairs not measured now"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite --out.md from --out.json, measure nothing")
    parser.add_argument("--run", nargs=5, metavar=("OP", "CODEC", "TILE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        operation, codec_name, tile, source, target = args.run
        run_one(operation, codec_name, int(tile), source, target)
        return
    script = [sys.executable, "-W", "ignore", __file__, "--run"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    if args.report_only:
        args.update, args.codecs = True, []
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "photo.png"
        if args.codecs:
            mosaic(args.width, args.height).save(source)
        for codec in args.codecs:
            for mode in args.modes:
                tile = "0" if mode == "tiled" else str(max(args.width, args.height))
                coded, decoded = Path(work) / f"{codec}-{mode}.evc", Path(work) / f"{codec}-{mode}.png"
                encode = timed([*script, "encode", codec, tile, str(source), str(coded)], env)
                row = {
                    "codec": codec,
                    "mode": mode,
                    "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "load_average_before": round(os.getloadavg()[0], 1),
                    "encode": encode,
                }
                if encode["status"] == 0:
                    row["bytes"] = coded.stat().st_size
                    row["decode"] = timed([*script, "decode", codec, tile, str(coded), str(decoded)], env)
                    if row["decode"]["status"] == 0:
                        a = np.asarray(Image.open(decoded).convert("RGB"), dtype=np.float64)
                        b = np.asarray(Image.open(source).convert("RGB"), dtype=np.float64)
                        row["psnr_db"] = round(10 * np.log10(255**2 / np.mean((a - b) ** 2)), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.update and Path(args.out + ".json").exists():
        measured = {(row["codec"], row["mode"]) for row in rows}
        kept = [
            r
            for r in json.loads(Path(args.out + ".json").read_text())["rows"]
            if (r["codec"], r["mode"]) not in measured
        ]
        rows = sorted(kept + rows, key=lambda r: (r["codec"], r["mode"]))
    machine = f"{cpu_model()}, {os.cpu_count()} cores (shared with other jobs), no GPU"
    report = {
        "machine": machine,
        "image": f"{args.width}x{args.height} mosaic of scikit-image photos",
        "threads": args.threads,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Tiled vs untiled coding of a {args.width}x{args.height} photo (CPU)",
        "",
        f"Machine: {machine}. Torch threads: {args.threads}. Reproduce: `python bench/codec_tiling.py` (all rows;",
        "rows can be re-measured alone with `--update --codecs C --modes M`, as after the first, loaded run).",
        "Peak RSS and wall time from `/usr/bin/time -v`, one process per operation (start-up and model load included).",
        "Tiled: the shipped codecs' 1024 x 1024 tiles (container version 2); untiled: one tile the size of the image.",
        "",
        "Other jobs shared the CPU during some runs: column load is the 1-minute load average before the row",
        "started (2 = both cores busy with other work); wall times of loaded runs are inflated, peak memory is not.",
        "",
        "| codec | mode | bytes | bpp | PSNR dB | encode s | encode peak MB | decode s | decode peak MB | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        enc, dec = row["encode"], row.get("decode", {})
        bpp = f"{8 * row['bytes'] / (args.width * args.height):.4f}" if "bytes" in row else "-"
        lines.append(
            f"| {row['codec']} | {row['mode']} | {row.get('bytes', '-')} | {bpp} | {row.get('psnr_db', '-')} | "
            f"{enc['wall_s'] if enc['status'] == 0 else 'failed'} | {enc['peak_rss_mb']} | "
            f"{dec.get('wall_s', '-') if dec.get('status', 1) == 0 else 'failed'} | {dec.get('peak_rss_mb', '-')} | "
            f"{row.get('load_average_before', '-')} |"
        )
    failures = [
        (r["codec"], r["mode"], op, r[op]["error"])
        for r in rows
        for op in ("encode", "decode")
        if op in r and r[op]["status"]
    ]
    if failures:
        lines += ["", "Failures:", *[f"- {c} {m} {op}: `{e}`" for c, m, op, e in failures]]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
