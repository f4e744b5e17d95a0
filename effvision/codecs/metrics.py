"""Image quality metrics for codecs: PSNR and MS-SSIM on [0, 1] images."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(reference: Tensor, distorted: Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of two images/batches in [0, peak] (mean over all elements); inf when identical."""
    mse = F.mse_loss(distorted.float(), reference.float()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def _differentiable_ms_ssim(reference: Tensor, distorted: Tensor) -> Tensor:
    """MS-SSIM (Wang et al. 2003) via pytorch_msssim; images too small for 5 scales (<= 160 px) use
    fewer scales (renormalised weights) instead of failing."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    if reference.dim() == 3:
        reference, distorted = reference[None], distorted[None]
    side = min(reference.shape[-2:])
    weights = list(_MS_SSIM_WEIGHTS)
    while len(weights) > 1 and side <= 10 * 2 ** (len(weights) - 1):
        weights.pop()
    total = sum(weights)
    return _ms_ssim(reference.float(), distorted.float(), data_range=1.0, weights=[w / total for w in weights])


def ms_ssim(reference: Tensor, distorted: Tensor) -> float:
    """MS-SSIM of (B, 3, H, W) or (3, H, W) images in [0, 1] (1 = identical)."""
    return float(_differentiable_ms_ssim(reference, distorted))


def ms_ssim_loss(reference: Tensor, distorted: Tensor) -> Tensor:
    """Differentiable ``1 - MS-SSIM`` for training."""
    return 1.0 - _differentiable_ms_ssim(reference, distorted)
