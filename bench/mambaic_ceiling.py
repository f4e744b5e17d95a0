"""How far can each shipped MambaIC quality go? PSNR of its transforms without quantisation (the rate -> infinity
ceiling), with y rounded, and of the trained model's forward pass, on validation photos.

If the unquantised ``g_s(g_a(x))`` is barely above the coded quality, spending more bits (a larger lambda) cannot
buy quality: the transforms are the limit, and a wider range needs wider or longer-trained transforms.

    OMP_NUM_THREADS=1 python bench/mambaic_ceiling.py            # scikit-image chelsea + coffee (validation)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    from effvision.codecs.adapters import shipped_weights
    from effvision.codecs.mambaic import qualities
    from effvision.codecs.mambaic.checkpoint import load_checkpoint
    from effvision.codecs.metrics import psnr
    from effvision.codecs.vqgan.demo_data import load_photo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=["chelsea", "coffee"], help="scikit-image photo names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = [torch.from_numpy(load_photo(name)).permute(2, 0, 1).float().div(255)[None] for name in args.photos]
    weights = shipped_weights("mambaic")
    print(f"photos: {', '.join(args.photos)}; mean PSNR (dB)")
    print("| quality | g_s(g_a(x)), no quantisation | g_s(round(y)) | forward pass x_hat (eval mode) |")
    print("|---|---:|---:|---:|")
    for quality in qualities():
        model = load_checkpoint(weights[f"lite-q{quality}"]).eval()
        rows = []
        with torch.no_grad():
            for x in images:
                height, width = x.shape[-2:]
                y = model.g_a(model.pad(x))
                rows.append((
                    psnr(x, model.g_s(y)[..., :height, :width].clamp(0, 1)),
                    psnr(x, model.g_s(torch.round(y))[..., :height, :width].clamp(0, 1)),
                    psnr(x, model(x)["x_hat"].clamp(0, 1)),
                ))
        ceiling, rounded, forward = np.mean(rows, axis=0)
        print(f"| q{quality} | {ceiling:.2f} | {rounded:.2f} | {forward:.2f} |")


if __name__ == "__main__":
    main()
