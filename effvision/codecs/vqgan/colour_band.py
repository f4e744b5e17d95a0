"""Low-band colour correction for the VQGAN codec: a few hundred bytes that put back each region's colour.

Our extension, not part of Mao et al. (DCC 2024). A small VQGAN codes colour relative to the area its
GroupNorm and attention see, so a whole photo comes back with a colour cast (bench/results/codec-rd-vqgan-cpu.md).
The encoder decodes its own index map to ``x_hat``, takes the difference ``x - x_hat`` in YCbCr, averages it
over ``factor x factor`` blocks, quantises it with ``step``, and codes the integer grid (MED prediction, as in
JPEG-LS, then rANS under a discretised Laplace law whose scale is chosen per channel). The decoder adds the
bicubic-upsampled correction back to its ``x_hat``. The correction is a smooth field, so neither side needs
bit-exact floats: a slightly different ``x_hat`` only moves the result by as much.

Stream layout (``bytes``): ``COLOUR_BAND`` id, log2 of ``factor``, ``step`` in 1/1024, one scale index per
channel (Y, Cb, Cr), then one rANS stream of the 3 x ceil(H/factor) x ceil(W/factor) residuals (channel-major,
rows in raster order). Everything a file can say is bounded before decoding: factor 8-64 px, step 1-255/1024,
scale indices within :data:`SCALES`, grid values within +-:data:`MAX_LEVEL`.

Shapes: ``x``, ``x_hat``: (3, H, W) in [0, 1]; the grid: (3, ceil(H / factor), ceil(W / factor)) integers.
"""

from __future__ import annotations

import functools
import math
import struct

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from effvision.codecs.rans import (
    SYMBOL_SLACK_BITS,
    CorruptStreamError,
    RansStreamDecoder,
    encode_with_indexes,
    min_stream_bytes,
)

#: first byte of a colour-band stream (index streams start with 0 = fixed length or 1 = rANS)
COLOUR_BAND = 2
HEADER = struct.Struct("<BBB3B")
DEFAULT_FACTOR = 32
DEFAULT_STEP_CODE = 32  # 32 / 1024 = 0.03125 of the [0, 1] range
FACTOR_LOG2_RANGE = (3, 6)
STEP_UNIT = 1.0 / 1024
#: Laplace scales (in quantisation steps) a channel may be coded with
SCALES = tuple(0.25 * 1.25**i for i in range(24))
#: residuals beyond +-TAIL are coded by compressai's escape (bypass) mechanism
TAIL = 48
#: largest |level| a grid may hold: a YCbCr difference of images in [0, 1] is within +-1, i.e. 1024 steps
MAX_LEVEL = 1024
CDF_PRECISION = 16

#: full-range BT.601 RGB -> YCbCr (offsets dropped: only differences are coded)
_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)


def grid_shape(height: int, width: int, factor: int) -> tuple[int, int]:
    """(rows, columns) of the correction grid of an (H, W) image."""
    return -(-height // factor), -(-width // factor)


def _to_ycbcr(x: Tensor) -> Tensor:
    return torch.einsum("ij,jhw->ihw", _RGB_TO_YCBCR.to(x.dtype), x)


def block_means(x: Tensor, factor: int) -> Tensor:
    """(C, H, W) or (B, C, H, W) -> (..., ceil(H/f), ceil(W/f)) block averages (edge-replicated padding)."""
    height, width = x.shape[-2:]
    return F.avg_pool2d(F.pad(x, (0, -width % factor, 0, -height % factor), mode="replicate"), factor)


def upsample_blocks(grid: Tensor, factor: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`block_means` for a smooth field: (B, C, rows, columns) -> (B, C, H, W), bicubic."""
    upsampled = F.interpolate(grid, scale_factor=factor, mode="bicubic", align_corners=False)
    return upsampled[..., :height, :width]


def low_band_corrected(decoded: Tensor, x: Tensor, factor: int = DEFAULT_FACTOR) -> Tensor:
    """``decoded`` with its ``factor``-block means moved onto those of ``x`` (both (B, 3, H, W)): what the colour
    band does, unquantised and differentiable. Index refinement and decoder training take their loss on it."""
    return decoded + upsample_blocks(block_means(x - decoded, factor), factor, *x.shape[-2:])


def _predictions(levels: np.ndarray) -> np.ndarray:
    """MED (median edge detector) prediction of every grid value from its decoded neighbours (rows, cols)."""
    left = np.zeros_like(levels)
    above = np.zeros_like(levels)
    corner = np.zeros_like(levels)
    left[:, 1:] = levels[:, :-1]
    above[1:, :] = levels[:-1, :]
    corner[1:, 1:] = levels[:-1, :-1]
    low, high = np.minimum(left, above), np.maximum(left, above)
    prediction = np.where(corner >= high, low, np.where(corner <= low, high, left + above - corner))
    prediction[0, :] = left[0, :]  # first row: the value to the left
    prediction[1:, 0] = above[1:, 0]  # first column: the value above
    return prediction


def _laplace_pmf(scale: float) -> list[float]:
    """Probabilities of residuals -TAIL..TAIL under a discretised Laplace law, then the escape's mass."""
    edges = torch.arange(-TAIL, TAIL + 2, dtype=torch.float64) - 0.5
    cdf = torch.where(edges < 0, 0.5 * torch.exp(edges / scale), 1 - 0.5 * torch.exp(-edges / scale))
    pmf = (cdf[1:] - cdf[:-1]).clamp_min(1e-9)
    escape = max(1.0 - float(pmf.sum()), 2.0**-CDF_PRECISION)
    return (pmf / pmf.sum() * (1 - escape)).tolist() + [escape]


@functools.cache
def _cdfs() -> list[list[int]]:
    """The quantised CDF of every scale in :data:`SCALES` (built once, on first use)."""
    from compressai._CXX import pmf_to_quantized_cdf

    return [pmf_to_quantized_cdf(_laplace_pmf(scale), CDF_PRECISION) for scale in SCALES]


def _best_scale(residuals: np.ndarray) -> int:
    """Index of the scale in :data:`SCALES` that codes ``residuals`` in the fewest bits (ideal code length)."""
    clipped = np.clip(residuals, -TAIL - 1, TAIL + 1) + TAIL + 1
    counts = np.bincount(clipped.ravel(), minlength=2 * TAIL + 3)
    best, best_bits = 0, math.inf
    for index, scale in enumerate(SCALES):
        pmf = np.asarray(_laplace_pmf(scale))
        table = np.concatenate([[pmf[-1]], pmf[:-1], [pmf[-1]]])  # below-range, in-range, above-range
        bits = float(-(counts * np.log2(table)).sum())
        if bits < best_bits:
            best, best_bits = index, bits
    return best


def encode_colour_band(
    x: Tensor, x_hat: Tensor, factor: int = DEFAULT_FACTOR, step_code: int = DEFAULT_STEP_CODE
) -> bytes:
    """Code the low band of ``x - x_hat`` (both (3, H, W) in [0, 1], any device) as a colour-band stream."""

    factor_log2 = int(math.log2(factor)) if factor > 0 else 0
    if 2**factor_log2 != factor or not FACTOR_LOG2_RANGE[0] <= factor_log2 <= FACTOR_LOG2_RANGE[1]:
        raise ValueError(f"colour band factor must be 8, 16, 32 or 64, got {factor}")
    if not 1 <= step_code <= 255:
        raise ValueError(f"colour band step code must be 1..255 (units of 1/1024), got {step_code}")
    difference = _to_ycbcr(x.detach().float().cpu()) - _to_ycbcr(x_hat.detach().float().cpu())
    levels = torch.round(block_means(difference, factor) / (step_code * STEP_UNIT))
    levels = levels.clamp(-MAX_LEVEL, MAX_LEVEL).to(torch.int64).numpy()
    residuals = [channel - _predictions(channel) for channel in levels]
    scales = [_best_scale(residual) for residual in residuals]
    symbols = np.concatenate([residual.ravel() for residual in residuals]).tolist()
    indexes = np.repeat(np.arange(3), levels[0].size).tolist()
    cdfs = [_cdfs()[scale] for scale in scales]
    stream = encode_with_indexes(symbols, indexes, cdfs, [len(c) for c in cdfs], [-TAIL] * 3)
    return HEADER.pack(COLOUR_BAND, factor_log2, step_code, *scales) + stream


def parse_header(stream: bytes) -> tuple[int, float, list[int]]:
    """Validate a colour-band header: (factor, step, scale indices). Raises :class:`CorruptStreamError`."""
    if not isinstance(stream, bytes | bytearray) or len(stream) < HEADER.size:
        raise CorruptStreamError(f"colour band is shorter than its {HEADER.size}-byte header")
    kind, factor_log2, step_code, *scales = HEADER.unpack_from(stream)
    if kind != COLOUR_BAND:
        raise CorruptStreamError(f"colour band has id {kind}, expected {COLOUR_BAND}")
    if not FACTOR_LOG2_RANGE[0] <= factor_log2 <= FACTOR_LOG2_RANGE[1]:
        raise CorruptStreamError(f"colour band block size 2**{factor_log2} is outside 8..64 pixels")
    if step_code == 0:
        raise CorruptStreamError("colour band has a zero quantisation step")
    if max(scales) >= len(SCALES):
        raise CorruptStreamError(f"colour band scale index {max(scales)} (the table has {len(SCALES)})")
    return 2**factor_log2, step_code * STEP_UNIT, scales


def check_colour_band(stream: bytes, height: int, width: int) -> tuple[int, float, list[int]]:
    """Cheap checks before decoding: a valid header, and a payload long enough for the residuals the image
    size implies under the chosen scales (each symbol costs at least -log2 of its CDF's largest step).
    Returns the header, as :func:`parse_header`."""
    factor, step, scales = parse_header(stream)
    rows, columns = grid_shape(height, width, factor)
    payload = len(stream) - HEADER.size
    least_bits = 0.0
    for scale in scales:
        cdf = _cdfs()[scale]
        largest = max(b - a for a, b in zip(cdf[:-1], cdf[1:], strict=True))
        least_bits += rows * columns * max(0.0, -math.log2(largest / (1 << CDF_PRECISION)) - SYMBOL_SLACK_BITS)
    needed = min_stream_bytes(least_bits)
    if payload < needed or payload % 4:
        raise CorruptStreamError(f"colour band has {payload} payload bytes; {3 * rows * columns} residuals need at "
                                 f"least {needed}, in 4-byte words")
    return factor, step, scales


def decode_colour_band(stream: bytes, height: int, width: int) -> Tensor:
    """The (3, H, W) RGB correction (CPU float32) a colour-band stream codes (add it to ``x_hat``, then clamp)."""
    factor, step, scales = check_colour_band(stream, height, width)
    rows, columns = grid_shape(height, width, factor)
    decoder = RansStreamDecoder(bytes(stream[HEADER.size :]))
    cdfs = [_cdfs()[scale] for scale in scales]
    symbols = decoder.decode([c for c in range(3) for _ in range(rows * columns)], cdfs,
                             [len(c) for c in cdfs], [-TAIL] * 3)
    decoder.finish()
    residuals = np.asarray(symbols, dtype=np.int64).reshape(3, rows, columns)
    if np.abs(residuals).max(initial=0) > 2 * MAX_LEVEL:
        raise CorruptStreamError("colour band holds a residual outside the range an image can have")
    levels = np.zeros_like(residuals)
    for channel in range(3):  # undo the prediction in raster order (each value needs its decoded neighbours)
        grid, residual = levels[channel], residuals[channel]
        for row in range(rows):
            for column in range(columns):
                left = grid[row, column - 1] if column else 0
                above = grid[row - 1, column] if row else 0
                if row == 0:
                    prediction = left
                elif column == 0:
                    prediction = above
                else:
                    corner = grid[row - 1, column - 1]
                    low, high = min(left, above), max(left, above)
                    prediction = low if corner >= high else high if corner <= low else left + above - corner
                value = int(prediction) + int(residual[row, column])
                if abs(value) > MAX_LEVEL:
                    raise CorruptStreamError("colour band decodes to a level outside the range an image can have")
                grid[row, column] = value
    correction = upsample_blocks(torch.from_numpy(levels).float()[None] * step, factor, height, width)[0]
    return torch.einsum("ij,jhw->ihw", _YCBCR_TO_RGB, correction)
