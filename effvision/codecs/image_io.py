"""Read any image file as an RGB float tensor, write PNGs atomically.

Codecs and their tools see (3, H, W) float32 tensors in [0, 1]. Grayscale is replicated to RGB, an
alpha channel is composited onto white, 16-bit and float images are rescaled to [0, 1], palette images
are expanded, an EXIF orientation is applied (pixels come out upright). Files that are not images,
truncated or corrupt raise :class:`UserError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from effvision.errors import UserError
from effvision.io_utils import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: refuse decompression bombs: 2**28 pixels is 3 GiB as float32 RGB.
MAX_PIXELS = 1 << 28


def _to_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from any PIL mode."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.float64)
        data = data / (65535.0 if data.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0)
        return np.repeat(np.clip(data, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    if image.mode == "F":
        data = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
        return np.repeat(data[..., None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path) -> torch.Tensor:
    """Load ``path`` as a (3, H, W) float32 tensor in [0, 1].

    Raises:
        UserError: the file is missing, not an image, truncated/corrupt, or absurdly large.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise UserError(f"{path}: {image.width}x{image.height} is too large (max {MAX_PIXELS} pixels)")
            image.load()
            array = _to_array(ImageOps.exif_transpose(image))
    except UnidentifiedImageError as error:
        raise UserError(f"{path} is not an image file (or not a format Pillow can read)") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{path} is a corrupt or truncated image ({error})") from error
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{path}: empty image")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (rounded)."""
    return (image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write a (3, H, W) float image in [0, 1] as an 8-bit PNG, atomically (temp file + rename)."""
    with atomic_path(path) as temp:
        Image.fromarray(to_uint8(image)).save(temp, format="PNG")


def list_images(directory: str | Path) -> list[Path]:
    """Image files (by suffix) directly in or below ``directory``, sorted; UserError if none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"not a directory: {directory}")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return files
