"""Triton kernel of the weighted token merge (math in ``token_merge.py``); imported lazily.

The sources are first grouped by destination on the device (a stable ``argsort`` of ``dst_index`` and
a ``searchsorted`` for each destination's bounds, a few tiny launches over (B, r) indices). The kernel
then runs one program per (output token, block of channels): it loads its kept row, walks exactly its
own sources in list order and accumulates them in fp32, and writes the row (and, size-weighted, the
new size). No atomics, and every output row is summed in the same order on every run: the result is
deterministic and correct however many sources land on one destination, and a destination costs one
row load per source instead of a scan over the whole source list.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _dispatch

MAX_BLOCK_C = 1024
NUM_WARPS = 4


@triton.jit
def _merge_kernel(
    x_ptr, keep_ptr, keep_weight_ptr, src_ptr, bounds_ptr, src_weight_ptr, size_ptr, out_ptr, out_size_ptr,
    n_tokens, n_out, n_src, channels,
    HAS_KEEP_WEIGHT: tl.constexpr, HAS_SRC: tl.constexpr, HAS_SRC_WEIGHT: tl.constexpr,
    SIZE_WEIGHTED: tl.constexpr, BLOCK_C: tl.constexpr,
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
        # Sources of this destination, sorted by destination: positions [first, last) of the lists.
        bounds = bounds_ptr + batch * (n_out + 1) + destination
        first = tl.load(bounds).to(tl.int32)
        last = tl.load(bounds + 1).to(tl.int32)
        for position in range(first, last):
            src = tl.load(src_ptr + batch * n_src + position).to(tl.int64)
            source_row = tl.load(x_batch + src * channels + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            if SIZE_WEIGHTED:
                weight = tl.load(size_ptr + batch * n_tokens + src).to(tl.float32)
                total_size += weight
                source_row = source_row * weight
            elif HAS_SRC_WEIGHT:
                source_row = source_row * tl.load(src_weight_ptr + batch * n_src + position).to(tl.float32)
            acc += source_row
    if SIZE_WEIGHTED:
        acc = acc / total_size
        tl.store(out_size_ptr + row, total_size.to(out_size_ptr.dtype.element_ty), mask=channel_block == 0)
    tl.store(out_ptr + row * channels + offs_c, acc.to(out_ptr.dtype.element_ty), mask=mask_c)


def sources_by_destination(
    src_index: Tensor, dst_index: Tensor, src_weight: Tensor | None, n_out: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Reorder the source lists by destination, keeping list order within a destination (stable).

    Returns (sources, weights, bounds): the sources of destination ``j`` in batch row ``b`` are
    ``sources[b, bounds[b, j]:bounds[b, j + 1]]`` (destinations are checked to lie in ``[0, n_out)``).
    """
    order = torch.argsort(dst_index, dim=1, stable=True)
    sorted_dst = dst_index.gather(1, order).contiguous()
    sources = src_index.gather(1, order).contiguous()
    weights = None if src_weight is None else src_weight.gather(1, order).contiguous()
    targets = torch.arange(n_out + 1, device=dst_index.device, dtype=sorted_dst.dtype)
    bounds = torch.searchsorted(sorted_dst, targets.expand(dst_index.shape[0], -1).contiguous())
    return sources, weights, bounds


def _launch(x, keep_index, src_index, dst_index, keep_weight, src_weight, size):
    batch, n_tokens, channels = x.shape
    _dispatch.check_index(keep_index, "keep_index", batch, n_tokens)
    n_out = keep_index.shape[1]
    if (src_index is None) != (dst_index is None):
        raise ValueError("src_index and dst_index go together: pass both or neither")
    n_src = 0 if src_index is None else src_index.shape[1]
    if src_index is not None:
        _dispatch.check_index(src_index, "src_index", batch, n_tokens)
        _dispatch.check_index(dst_index, "dst_index", batch, n_out, width=n_src)  # no destination is dropped
    _dispatch.check_shape(keep_weight, "keep_weight", (batch, n_out))
    _dispatch.check_shape(src_weight, "src_weight", (batch, n_src))
    _dispatch.check_shape(size, "size", (batch, n_tokens))
    has_src = n_src > 0
    x = x.contiguous()
    out = _dispatch.new_output((batch, n_out, channels), x.dtype, x.device)
    out_size = _dispatch.new_output((batch, n_out), size.dtype, x.device) if size is not None else None
    if batch * n_out == 0 or channels == 0:
        if out_size is not None and batch * n_out:  # no launch: the merged sizes are still the sums
            merged = torch.gather(size, 1, keep_index)
            if has_src:
                merged = merged.scatter_add(1, dst_index, torch.gather(size, 1, src_index))
            out_size.copy_(merged)
        return out, out_size
    sources = weights = bounds = None
    if has_src:
        sources, weights, bounds = sources_by_destination(src_index, dst_index, src_weight, n_out)
    block_c = min(triton.next_power_of_2(channels), MAX_BLOCK_C)
    grid = (batch * n_out, triton.cdiv(channels, block_c))
    _merge_kernel[grid](
        x, keep_index.contiguous(), None if keep_weight is None else keep_weight.contiguous(),
        sources, bounds, weights, None if size is None else size.contiguous(), out, out_size,
        n_tokens, n_out, n_src, channels,
        HAS_KEEP_WEIGHT=keep_weight is not None, HAS_SRC=has_src, HAS_SRC_WEIGHT=weights is not None,
        SIZE_WEIGHTED=size is not None, BLOCK_C=block_c, num_warps=NUM_WARPS,
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

