"""What the KLT start (scripts/init_mambaic_klt.py) could reach with an ideal entropy model, beside JPEG.

For a latent width M and a lambda, the transforms are set exactly as ``init_mambaic_klt.py`` sets them; the test
photos are coded with rounding (no entropy model), and the rate of the rounded latents is measured three ways:

* ``hist``: a static histogram per channel, fitted on the training crops (the best factorized code);
* ``gauss``: a static zero-mean Gaussian per channel at its best scale (what ``--entropy-start factorized``
  starts from; the Gaussian conditional's family);
* ``oracle``: a zero-mean Gaussian whose scale is the RMS of each channel over each 4x4 block of latent positions
  (64x64 pixels, the hyperprior's grid), given to the decoder for free: a bound on what a hyperprior buys when
  its side information costs nothing.

PSNR is the mean over photos of ``g_s(round(y))``; ``jpeg@oracle`` is JPEG's PSNR at the oracle's rate,
interpolated on JPEG's mean curve of ``codec-rd-cpu.json``. Rates are y only (no z)::

    OMP_NUM_THREADS=1 python bench/mambaic_klt_bounds.py --widths 100 --lambdas 0.0045 0.0065 0.013 0.025 0.0483
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]


def histogram_bits(values: Tensor, train: Tensor) -> float:
    """Code length of ``values`` (1, M, h, w) under per-channel histograms of ``train`` (N, M, h', w'), with
    add-0.01 smoothing over the training range (values outside it are clamped to its ends)."""
    low, high = int(train.min()), int(train.max())
    bits = 0.0
    for channel in range(train.shape[1]):
        counts = torch.bincount((train[:, channel] - low).long().flatten(), minlength=high - low + 1).double()
        probability = (counts + 0.01) / (counts + 0.01).sum()
        index = (values[:, channel].clamp(low, high) - low).long().flatten()
        bits += float(-probability[index].log2().sum())
    return bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("/work/photo-corpus/train.npy"))
    parser.add_argument("--images", type=Path, default=Path("/work/photo-corpus/test"))
    parser.add_argument("--widths", type=int, nargs="+", default=[100])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0045, 0.0065, 0.013, 0.025, 0.0483])
    parser.add_argument("--jpeg", type=Path, default=ROOT / "bench/results/codec-rd-cpu.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "scripts"))
    from init_mambaic_klt import best_gaussian_scales, gaussian_bin_mass, quantisation_step, set_klt_transforms
    from train_mambaic_ladder import corpus_crops

    from effvision.codecs.mambaic import CONFIGS, MambaIC
    from effvision.image_io import open_image

    torch.set_grad_enabled(False)
    crops = torch.stack(corpus_crops(args.corpus))
    photos = [
        torch.from_numpy(np.array(open_image(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        for path in sorted(args.images.glob("*.png"))
    ]
    jpeg = json.loads(args.jpeg.read_text())["classical_mean"]["jpeg"]

    def gaussian_bits(values: Tensor, scales: Tensor) -> float:
        """Code length (bits) of integer ``values`` under zero-mean Gaussians of ``scales`` (same shape)."""
        return float(-gaussian_bin_mass(values, scales.clamp_min(0.11)).clamp_min(1e-12).log2().sum())

    def jpeg_psnr(bpp: float) -> float:
        return float(np.interp(bpp, [row["bpp"] for row in jpeg], [row["psnr"] for row in jpeg]))

    print("| M | lambda | PSNR | hist bpp | gauss bpp | oracle bpp | jpeg@oracle |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for width in args.widths:
        config = replace(CONFIGS["lite"], latent_channels=width, name=f"klt{width}")
        for lmbda in args.lambdas:
            model = MambaIC(config).eval()
            set_klt_transforms(model, crops, quantisation_step(lmbda))
            train = torch.cat([model.g_a(chunk) for chunk in crops.split(32)]).round()
            scales = best_gaussian_scales(train)
            psnr = hist = gauss = oracle = pixels = 0.0
            for photo in photos:
                height, width_px = photo.shape[-2:]
                y = model.g_a(model.pad(photo[None])).round()
                decoded = model.g_s(y)[..., :height, :width_px].clamp(0, 1)
                psnr += -10 * math.log10(float(F.mse_loss(decoded, photo[None])))
                pixels += height * width_px
                hist += histogram_bits(y, train)
                gauss += gaussian_bits(y, scales[None, :, None, None].expand_as(y))
                local = F.avg_pool2d(y**2, 4, ceil_mode=True).sqrt().repeat_interleave(4, -2).repeat_interleave(4, -1)
                oracle += gaussian_bits(y, local[..., : y.shape[-2], : y.shape[-1]])
            psnr /= len(photos)
            print(f"| {width} | {lmbda} | {psnr:.2f} | {hist / pixels:.3f} | {gauss / pixels:.3f} | "
                  f"{oracle / pixels:.3f} | {jpeg_psnr(oracle / pixels):.2f} |", flush=True)


if __name__ == "__main__":
    main()
