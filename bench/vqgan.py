"""VQGAN extreme-compression benchmark: bpp from real bitstream bytes at K in {16, 64, 256, 1024}, fixed-length
vs learned (rANS) index coding, PSNR / MS-SSIM, encode/decode time, and lost-index restoration.

Runs the small demo codec shipped in effvision/assets (NOT the ImageNet f16-16384 VQGAN of Mao et al.) on the
scikit-image photos held out from its training (astronaut, chelsea). LPIPS is not reported: no installable
package ships its backbone weights offline.

    OMP_NUM_THREADS=1 python bench/vqgan.py            # writes bench/results/vqgan-cpu.json and .md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from pytorch_msssim import ms_ssim

from effvision.codecs.vqgan.demo_data import held_out_photos
from effvision.codecs.vqgan.model import VQGANCodec, demo_weights_path
from effvision.codecs.vqgan.restoration import random_mask

RESULTS = Path(__file__).resolve().parent / "results"
CODEBOOK_SIZES = (16, 64, 256, 1024)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / torch.mean((a - b) ** 2)))


def timed(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def codec_for(base: VQGANCodec, k: int) -> VQGANCodec:
    # K equal to the trained codebook size is the trained codebook itself (K-means would return it unchanged)
    return base if k == base.codebook_size else base.cluster(k, seed=0)


def evaluate(codec: VQGANCodec, name: str, x: torch.Tensor, repeats: int) -> dict:
    pixels = x.shape[-2] * x.shape[-1]
    row = {"image": name, "size": [int(x.shape[-1]), int(x.shape[-2])], "k": codec.codebook_size}
    h, w = codec.index_grid(x.shape[-2:])
    indices = codec.encode_indices(x)[0]
    for coder in ("fixed", "learned"):
        out, encode_s = timed(lambda c=coder: codec.compress(x, coder=c), repeats)
        decoded, decode_s = timed(lambda o=out: codec.decompress(o["strings"], o["shape"])["x_hat"], repeats)
        row[f"bpp_{coder}"] = 8 * len(out["strings"][0][0]) / pixels
        row[f"encode_s_{coder}"] = encode_s
        row[f"decode_s_{coder}"] = decode_s
    row["bpp_fixed_formula"] = math.log2(codec.codebook_size) * h * w / pixels
    row["bpp_learned_ideal"] = codec.index_model.ideal_bits(indices) / pixels
    row["psnr"] = psnr(decoded, x)
    row["ms_ssim"] = float(ms_ssim(decoded, x, data_range=1.0))
    return row


def restoration(codec: VQGANCodec, name: str, x: torch.Tensor, ratio: float = 0.2, trials: int = 3) -> dict:
    """PSNR / MSE vs the undamaged decode when ``ratio`` of the indices are lost."""
    indices = codec.encode_indices(x)
    reference = codec.decode_indices(indices, x.shape[-2:])
    most_common = int(torch.bincount(codec.reference_maps.flatten(), minlength=codec.codebook_size).argmax())
    mse_restored, mse_constant = [], []
    for trial in range(trials):
        lost = random_mask(indices.shape, ratio, torch.Generator().manual_seed(trial))
        restored = codec.decode_indices(codec.restore_indices(indices, lost), x.shape[-2:])
        constant = codec.decode_indices(indices.masked_fill(lost, most_common), x.shape[-2:])
        mse_restored.append(float(torch.mean((restored - reference) ** 2)))
        mse_constant.append(float(torch.mean((constant - reference) ** 2)))
    return {
        "image": name, "k": codec.codebook_size, "lost_fraction": ratio, "trials": trials,
        "mse_restored": statistics.mean(mse_restored), "mse_constant_fill": statistics.mean(mse_constant),
        "psnr_restored_vs_undamaged": 10 * math.log10(1 / statistics.mean(mse_restored)),
        "psnr_constant_vs_undamaged": 10 * math.log10(1 / statistics.mean(mse_constant)),
    }


def markdown(report: dict) -> str:
    lines = [
        "# VQGAN extreme compression (small demo codec, CPU)",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}`.",
        "",
        "This is the **small VQGAN** shipped in effvision/assets (4000 steps on 64x64 crops of scikit-image",
        "photos, then 450 steps on 128x128 crops of the photo corpus; scripts/train_vqgan_photos.py), **not** the",
        "ImageNet f16-16384 VQGAN of Mao et al. It is under-trained and blurry; for its rate-distortion against",
        "classical codecs on 768x512 photos see codec-rd-vqgan-cpu.md.",
        "Images: scikit-image `astronaut` (512x512) and `chelsea` (451x300), held out from all its training.",
        "bpp is 8 x stream bytes / pixels (3-byte header included); K < 1024 are K-means clusterings of the",
        "1024-entry codebook without fine-tuning. Times are medians, single thread. This measures Mao et al.'s",
        "codec (`VQGANCodec.compress()`) without the colour band that `effvision encode` adds (~0.005 bpp).",
        "",
        "| image | K | bpp fixed | bpp learned | learned/fixed | PSNR dB | MS-SSIM | enc s | dec s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rate"]:
        lines.append(
            f"| {r['image']} | {r['k']} | {r['bpp_fixed']:.4f} | {r['bpp_learned']:.4f} | "
            f"{r['bpp_learned'] / r['bpp_fixed']:.2f} | {r['psnr']:.2f} | {r['ms_ssim']:.3f} | "
            f"{r['encode_s_learned']:.3f} | {r['decode_s_learned']:.3f} |"
        )
    lines += ["", "Lost-index restoration (20% of indices dropped at random, distortion vs the undamaged decode):", "",
              "| image | K | PSNR restorer | PSNR constant fill (most frequent index) |", "|---|---|---|---|"]
    for r in report["restoration"]:
        lines.append(f"| {r['image']} | {r['k']} | {r['psnr_restored_vs_undamaged']:.2f} | "
                     f"{r['psnr_constant_vs_undamaged']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=demo_weights_path())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "vqgan-cpu")
    parser.add_argument("--max-side", type=int, help="crop photos to at most this many pixels (quick checks)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = VQGANCodec.load(args.weights)
    photos = [(name, torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255) for name, p in held_out_photos()]
    if args.max_side:
        photos = [(name, x[..., : args.max_side, : args.max_side]) for name, x in photos]
    rate, restored = [], []
    for k in CODEBOOK_SIZES:
        codec = codec_for(base, k)
        for name, x in photos:
            rate.append(evaluate(codec, name, x, args.repeats))
            if k in (256, 1024):
                restored.append(restoration(codec, name, x))
            print(json.dumps(rate[-1]), file=sys.stderr)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, 1 thread",
        "command": "OMP_NUM_THREADS=1 python bench/vqgan.py",
        "model": f"{args.weights.name} (small demo VQGAN, not the ImageNet f16-16384 model)",
        "rate": rate,
        "restoration": restored,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
