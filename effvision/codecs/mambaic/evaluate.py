"""Evaluate MambaIC checkpoints on real bitstreams against JPEG and WebP at the nearest bpp.

Per image: real bpp (bytes of every string), PSNR, MS-SSIM, encode/decode seconds. The classical
codecs (Pillow) are searched over quality 1..95 for the bpp closest to MambaIC's on that image.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effvision.codecs.mambaic.model import MambaIC, bits_per_pixel
from effvision.codecs.metrics import ms_ssim, psnr
from effvision.image_io import to_uint8


@dataclass
class Result:
    """One codec on one image."""

    image: str
    codec: str
    bpp: float
    psnr: float
    ms_ssim: float
    encode_s: float
    decode_s: float


@torch.no_grad()
def evaluate_model(model: MambaIC, name: str, image: torch.Tensor, label: str = "mambaic") -> Result:
    """Real encode + decode of one (3, H, W) image."""
    x = image[None].to(next(model.parameters()).device)
    started = time.perf_counter()
    coded = model.compress(x)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    x_hat = model.decompress(coded["strings"], coded["shape"])["x_hat"]
    decode_s = time.perf_counter() - started
    # metrics on the 8-bit image a user would get
    decoded = torch.from_numpy(to_uint8(x_hat[0]).astype(np.float32) / 255).permute(2, 0, 1)[None]
    x = x.cpu()
    return Result(
        name, label, bits_per_pixel(coded["strings"], *image.shape[-2:]), psnr(x, decoded), ms_ssim(x, decoded),
        encode_s, decode_s,
    )


def _pillow_round_trip(pixels: np.ndarray, fmt: str, quality: int) -> tuple[bytes, np.ndarray, float, float]:
    buffer = io.BytesIO()
    started = time.perf_counter()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=quality)
    encode_s = time.perf_counter() - started
    data = buffer.getvalue()
    started = time.perf_counter()
    with Image.open(io.BytesIO(data)) as decoded_image:
        decoded = np.asarray(decoded_image.convert("RGB"))
    return data, decoded, encode_s, time.perf_counter() - started


def evaluate_pillow(name: str, image: torch.Tensor, fmt: str, target_bpp: float) -> Result:
    """``fmt`` ("JPEG" or "WEBP") at the quality whose bpp is nearest ``target_bpp``."""
    pixels = to_uint8(image)
    height, width = pixels.shape[:2]
    best = None
    low, high = 1, 95
    # bpp grows with quality (monotone enough for a bisection), then check the neighbours
    while low < high:
        mid = (low + high) // 2
        size = len(_pillow_round_trip(pixels, fmt, mid)[0]) * 8 / (height * width)
        if size < target_bpp:
            low = mid + 1
        else:
            high = mid
    for quality in {max(1, low - 1), low}:
        data, decoded, encode_s, decode_s = _pillow_round_trip(pixels, fmt, quality)
        bpp = len(data) * 8 / (height * width)
        if best is None or abs(bpp - target_bpp) < abs(best[0] - target_bpp):
            best = (bpp, decoded, encode_s, decode_s)
    bpp, decoded, encode_s, decode_s = best
    reference = image[None]
    decoded_t = torch.from_numpy(decoded.astype(np.float32) / 255).permute(2, 0, 1)[None]
    return Result(name, fmt.lower(), bpp, psnr(reference, decoded_t), ms_ssim(reference, decoded_t), encode_s, decode_s)


def evaluate(
    models: dict[str, MambaIC], images: Sequence[tuple[str, torch.Tensor]], progress: bool = True
) -> list[Result]:
    """Every model on every image, each followed by JPEG and WebP at the nearest bpp."""
    from tqdm import tqdm

    results: list[Result] = []
    for model in models.values():  # warm-up: the first call pays one-off kernel/allocator set-up
        model.compress(torch.rand(1, 3, 64, 64, device=next(model.parameters()).device))
    jobs = [(label, model, name, image) for label, model in models.items() for name, image in images]
    for label, model, name, image in tqdm(jobs, disable=not progress, desc="eval-codec"):
        learned = evaluate_model(model, name, image, label)
        results.append(learned)
        for fmt in ("JPEG", "WEBP"):
            result = evaluate_pillow(name, image, fmt, learned.bpp)
            result.codec = f"{fmt.lower()}@{label}"
            results.append(result)
    return results


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| image | codec | bpp | PSNR (dB) | MS-SSIM | encode (s) | decode (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.image} | {r.codec} | {r.bpp:.4f} | {r.psnr:.2f} | {r.ms_ssim:.4f} "
            f"| {r.encode_s:.3f} | {r.decode_s:.3f} |"
        )
    return "\n".join(lines)


def rd_plot(results: Sequence[Result], path: str | Path) -> None:
    """PSNR vs bpp, mean over images, one curve per codec family (learned, jpeg, webp)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, dict[str, list[Result]]] = {}
    for r in results:
        family, _, point = r.codec.partition("@")
        family = "mambaic" if not point else family
        point = point or r.codec
        families.setdefault(family, {}).setdefault(point, []).append(r)
    fig, ax = plt.subplots(figsize=(5, 4))
    for family, points in families.items():
        xy = sorted(
            (float(np.mean([r.bpp for r in rs])), float(np.mean([r.psnr for r in rs]))) for rs in points.values()
        )
        ax.plot(*zip(*xy, strict=True), marker="o", label=family)
    ax.set_xlabel("bpp (real, from bytes)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    temp.replace(path)


def results_as_dicts(results: Sequence[Result]) -> list[dict]:
    return [asdict(r) for r in results]
