"""Triton kernel of the weighted token merge (math in ``token_merge.py``); imported lazily.

One program per (output token, block of channels). It loads its kept row, then walks the source list of
its batch row in tiles of ``BLOCK_S``: sources whose destination is this token are loaded (masked loads
fetch nothing for the others) and summed with ``tl.sum`` over the tile, tiles in order. Every output
row is therefore reduced in a fixed order, with no atomics and no sorting pass: the result is
deterministic and correct however many sources land on one destination. Accumulation is fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import _dispatch

BLOCK_S = 32
MAX_BLOCK_C = 128


@triton.jit
def _merge_kernel(
    x_ptr, keep_ptr, keep_weight_ptr, src_ptr, dst_ptr, src_weight_ptr, size_ptr, out_ptr, out_size_ptr,
    n_tokens, n_out, n_src, channels,
    HAS_KEEP_WEIGHT: tl.constexpr, HAS_SRC: tl.constexpr, HAS_SRC_WEIGHT: tl.constexpr,
    SIZE_WEIGHTED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # batch * n_out + destination
    channel_block = tl.program_id(1)
    batch = row // n_out
    destination = row % n_out
    offs_c = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    x_batch = x_ptr + batch * n_tokens * channels
    keep = tl.load(keep_ptr + row).to(tl.int64)
    acc = tl.load(x_batch + keep * channels + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if SIZE_WEIGHTED:
        total_size = tl.load(size_ptr + batch * n_tokens + keep).to(tl.float32)
        acc = acc * total_size
    elif HAS_KEEP_WEIGHT:
        acc = acc * tl.load(keep_weight_ptr + row).to(tl.float32)
    if HAS_SRC:
        for start in range(0, n_src, BLOCK_S):
            offs_s = start + tl.arange(0, BLOCK_S)
            in_range = offs_s < n_src
            dst = tl.load(dst_ptr + batch * n_src + offs_s, mask=in_range, other=-1)
            match = in_range & (dst == destination)
            src = tl.load(src_ptr + batch * n_src + offs_s, mask=match, other=0).to(tl.int64)
            rows = tl.load(
                x_batch + src[:, None] * channels + offs_c[None, :],
                mask=match[:, None] & mask_c[None, :], other=0.0,
            ).to(tl.float32)
            if SIZE_WEIGHTED:
                weight = tl.load(size_ptr + batch * n_tokens + src, mask=match, other=0.0).to(tl.float32)
                total_size += tl.sum(weight, axis=0)
                rows = rows * weight[:, None]
            elif HAS_SRC_WEIGHT:
                weight = tl.load(src_weight_ptr + batch * n_src + offs_s, mask=match, other=0.0)
                rows = rows * weight.to(tl.float32)[:, None]
            acc += tl.sum(rows, axis=0)
    if SIZE_WEIGHTED:
        acc = acc / total_size
        tl.store(out_size_ptr + row, total_size.to(out_size_ptr.dtype.element_ty), mask=channel_block == 0)
    tl.store(out_ptr + row * channels + offs_c, acc.to(out_ptr.dtype.element_ty), mask=mask_c)


def _launch(x, keep_index, src_index, dst_index, keep_weight, src_weight, size):
    batch, n_tokens, channels = x.shape
    n_out = keep_index.shape[1]
    n_src = 0 if src_index is None else src_index.shape[1]
    has_src = n_src > 0
    x = x.contiguous()
    out = _dispatch.new_output((batch, n_out, channels), x.dtype, x.device)
    out_size = _dispatch.new_output((batch, n_out), size.dtype, x.device) if size is not None else None
    if batch * n_out == 0 or channels == 0:
        return out, out_size
    block_c = min(triton.next_power_of_2(channels), MAX_BLOCK_C)
    grid = (batch * n_out, triton.cdiv(channels, block_c))
    _merge_kernel[grid](
        x, keep_index.contiguous(), None if keep_weight is None else keep_weight.contiguous(),
        src_index.contiguous() if has_src else None, dst_index.contiguous() if has_src else None,
        src_weight.contiguous() if has_src and src_weight is not None else None,
        None if size is None else size.contiguous(), out, out_size,
        n_tokens, n_out, n_src, channels,
        HAS_KEEP_WEIGHT=keep_weight is not None, HAS_SRC=has_src, HAS_SRC_WEIGHT=src_weight is not None,
        SIZE_WEIGHTED=size is not None, BLOCK_S=BLOCK_S, BLOCK_C=block_c,
    )
    return out, out_size


def merge_tokens_triton(
    x: Tensor,
    keep_index: Tensor,
    src_index: Tensor | None,
    dst_index: Tensor | None,
    keep_weight: Tensor | None,
    src_weight: Tensor | None,
) -> Tensor:
    """Weighted gather/merge (see ``token_merge.merge_tokens``)."""
    return _launch(x, keep_index, src_index, dst_index, keep_weight, src_weight, None)[0]


def size_weighted_merge_triton(
    x: Tensor, size: Tensor, keep_index: Tensor, src_index: Tensor, dst_index: Tensor
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge with sizes (batch, tokens); returns (merged, merged_size)."""
    return _launch(x, keep_index, src_index, dst_index, None, None, size)

