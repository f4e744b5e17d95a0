"""Image quality metrics for codecs: PSNR and MS-SSIM on [0, 1] images."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: the smallest image side the smallest (3 x 3) SSIM window fits in
MIN_SSIM_SIDE = 3
#: the largest image side at which MS-SSIM is not the standard one: a smaller window up to this side, and
#: single-scale SSIM at :data:`SINGLE_SCALE_SIDE` or less (see ``_differentiable_ms_ssim``)
REDUCED_MS_SSIM_SIDE = 160
SINGLE_SCALE_SIDE = 32


def psnr(reference: Tensor, distorted: Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of two images/batches in [0, peak] (mean over all elements); inf when identical."""
    mse = F.mse_loss(distorted.float(), reference.float()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def _differentiable_ms_ssim(reference: Tensor, distorted: Tensor) -> Tensor:
    """MS-SSIM (Wang et al. 2003) via pytorch_msssim, 5 scales, 11-tap Gaussian window.

    pytorch_msssim needs a side > 16 * (window - 1): smaller images use the largest odd window that
    fits (down to 3); images of 32 px or less fall back to single-scale SSIM. A side under
    :data:`MIN_SSIM_SIDE` is a :class:`ValueError`.
    """
    from pytorch_msssim import ms_ssim as _ms_ssim
    from pytorch_msssim import ssim as _ssim

    if reference.dim() == 3:
        reference, distorted = reference[None], distorted[None]
    side = min(reference.shape[-2:])
    if side < MIN_SSIM_SIDE:
        height, width = reference.shape[-2:]
        raise ValueError(f"MS-SSIM needs at least {MIN_SSIM_SIDE}x{MIN_SSIM_SIDE} pixels, got {width}x{height}")
    window = 11
    while window > 3 and side <= 16 * (window - 1):
        window -= 2
    if side <= 16 * (window - 1):
        largest_odd = side if side % 2 else side - 1
        return _ssim(reference.float(), distorted.float(), data_range=1.0, win_size=min(window, largest_odd))
    return _ms_ssim(reference.float(), distorted.float(), data_range=1.0, win_size=window, weights=_MS_SSIM_WEIGHTS)


def ms_ssim(reference: Tensor, distorted: Tensor) -> float:
    """MS-SSIM of (B, 3, H, W) or (3, H, W) images in [0, 1] (1 = identical)."""
    return float(_differentiable_ms_ssim(reference, distorted))


def ms_ssim_loss(reference: Tensor, distorted: Tensor) -> Tensor:
    """Differentiable ``1 - MS-SSIM`` for training."""
    return 1.0 - _differentiable_ms_ssim(reference, distorted)
