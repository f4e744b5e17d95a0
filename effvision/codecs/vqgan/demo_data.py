"""scikit-image's bundled photos as the VQGAN demo data set (no network access needed).

Grayscale photos are repeated to three channels; every photo is also used at half size so random crops
see both fine texture and larger structures. ``astronaut`` and ``chelsea`` are held out for evaluation.
"""

from __future__ import annotations

import numpy as np

TRAINING_NAMES = (
    "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
    "camera", "coins", "brick", "grass", "gravel", "moon", "clock", "cell", "colorwheel",
)
HELD_OUT_NAMES = ("astronaut", "chelsea")


def load_photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3) scikit-image photo ``name`` (stereo pairs give their left image)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def half_size(image: np.ndarray) -> np.ndarray:
    """2x2 box-filter downscale of a uint8 (H, W, 3) image."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3)
    return blocks.mean((1, 3)).round().astype(np.uint8)


def training_photos() -> list[np.ndarray]:
    photos = [load_photo(name) for name in TRAINING_NAMES]
    return photos + [half_size(p) for p in photos]


def held_out_photos() -> list[tuple[str, np.ndarray]]:
    return [(name, load_photo(name)) for name in HELD_OUT_NAMES]
