"""How far can each shipped MambaIC quality go? PSNR of its transforms without quantisation (the rate -> infinity
ceiling), with y rounded, and of the trained model's forward pass; beside them, the best any *linear* transform of
the same latent width could do.

If the unquantised ``g_s(g_a(x))`` is barely above the coded quality, spending more bits (a larger lambda) cannot
buy quality: the transforms are the limit, and a wider range needs wider or longer-trained transforms.

The linear column (with ``--fit``) cuts images into the 16x16 patches one latent position covers and keeps the top
``M`` principal components of the training patches (``M`` = the model's latent channels): the least-squares best
fixed linear transform with ``M`` outputs per patch, like a 16x16 stride-16 convolution and its transpose. The
learned transforms are non-linear and see across patches, so this is a reference, not a hard limit; a model that
is no better is using its latent width no better than PCA would.

    OMP_NUM_THREADS=1 python bench/mambaic_ceiling.py                         # scikit-image chelsea + coffee
    OMP_NUM_THREADS=1 python bench/mambaic_ceiling.py --images photos/test/   # a folder of images
    ... --fit photos/train.npy        # add the linear column, fitted on make_photo_corpus.py's training crops
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

PATCH = 16  # pixels per latent position along each side (four stride-2 stages)


def patches(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (P, PATCH * PATCH * 3) float64 in [0, 1]: the PATCH x PATCH patches tiling the image
    (a partial last row or column is left out)."""
    height, width = (image.shape[0] // PATCH) * PATCH, (image.shape[1] // PATCH) * PATCH
    pixels = image[:height, :width].astype(np.float64) / 255
    tiles = pixels.reshape(height // PATCH, PATCH, width // PATCH, PATCH, 3).transpose(0, 2, 1, 3, 4)
    return tiles.reshape(-1, PATCH * PATCH * 3)


def principal_patch_basis(images) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and principal directions (D, D), strongest first, of the patches of ``images``."""
    data = np.concatenate([patches(image) for image in images])
    mean = data.mean(axis=0)
    centred = data - mean
    _, vectors = np.linalg.eigh(centred.T @ centred)
    return mean, vectors[:, ::-1]


def linear_bound_psnr(image: np.ndarray, mean: np.ndarray, basis: np.ndarray, components: int) -> float:
    """PSNR (dB) of ``image``'s patches rebuilt from their first ``components`` coordinates in ``basis``."""
    data = patches(image)
    kept = basis[:, :components]
    rebuilt = np.clip((data - mean) @ kept @ kept.T + mean, 0, 1)
    return float(10 * np.log10(1 / np.mean((rebuilt - data) ** 2)))


def load_fit_images(path: str) -> list[np.ndarray]:
    """uint8 (H, W, 3) images to fit the basis on: a (N, H, W, 3) uint8 ``.npy`` or a folder of images."""
    from effvision.image_io import list_images, load_image, to_uint8

    if path.endswith(".npy"):
        return list(np.load(path, mmap_mode="r"))
    return [to_uint8(load_image(file)) for file in list_images(path)]


def main() -> None:
    from effvision.codecs.adapters import shipped_weights
    from effvision.codecs.mambaic import shipped_qualities
    from effvision.codecs.mambaic.checkpoint import load_checkpoint
    from effvision.codecs.metrics import psnr
    from effvision.codecs.vqgan.demo_data import load_photo
    from effvision.image_io import list_images, load_image, to_uint8

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", default=["chelsea", "coffee"], help="scikit-image photo names")
    parser.add_argument("--images", help="a folder of images to use instead of --photos")
    parser.add_argument("--fit", help="training images for the linear column: a uint8 (N, H, W, 3) .npy or a folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.images:
        paths = list_images(args.images)
        arrays = [to_uint8(load_image(path)) for path in paths]
        names = f"{len(paths)} images in {args.images}"
    else:
        arrays = [load_photo(name) for name in args.photos]
        names = ", ".join(args.photos)
    images = [torch.from_numpy(array).permute(2, 0, 1).float().div(255)[None] for array in arrays]
    weights = shipped_weights("mambaic")
    basis = principal_patch_basis(load_fit_images(args.fit)) if args.fit else None
    print(f"photos: {names}; mean PSNR (dB)")
    print(
        "| quality | latent channels | g_s(g_a(x)), no quantisation | g_s(round(y)) | forward pass x_hat (eval mode) "
        "| linear transform of that width (PCA) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for quality, name in shipped_qualities().items():
        model = load_checkpoint(weights[name]).float().eval()
        width = model.config.latent_channels
        rows = []
        with torch.no_grad():
            for x, array in zip(images, arrays, strict=True):
                height, width_px = x.shape[-2:]
                y = model.g_a(model.pad(x))
                rows.append(
                    (
                        psnr(x, model.g_s(y)[..., :height, :width_px].clamp(0, 1)),
                        psnr(x, model.g_s(torch.round(y))[..., :height, :width_px].clamp(0, 1)),
                        psnr(x, model(x)["x_hat"].clamp(0, 1)),
                        linear_bound_psnr(array, *basis, width) if basis else float("nan"),
                    )
                )
        ceiling, rounded, forward, linear = np.mean(rows, axis=0)
        print(f"| q{quality} | {width} | {ceiling:.2f} | {rounded:.2f} | {forward:.2f} | {linear:.2f} |")
    if basis:
        bounds = {m: np.mean([linear_bound_psnr(a, *basis, m) for a in arrays]) for m in (100, 160, 192, 320)}
        print(
            "linear transform (PCA) with more latent channels: "
            + ", ".join(f"{m}: {value:.2f} dB" for m, value in bounds.items())
        )


if __name__ == "__main__":
    main()
