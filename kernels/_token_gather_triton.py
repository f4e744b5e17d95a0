"""Triton kernel of the token gather (math in ``token_gather.py``); imported lazily.

One program per (output token, block of columns): it reads the token's index once and copies that
block of the token's row of ``x`` and of ``source`` (their widths may differ) and, in the first block,
its size. Pure data movement: output dtypes equal input dtypes, values are copied bit-exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _dispatch

MAX_BLOCK = 256


@triton.jit
def _gather_kernel(
    x_ptr, index_ptr, size_ptr, source_ptr, x_out_ptr, size_out_ptr, source_out_ptr,
    n_tokens, n_out, channels, source_width,
    HAS_SIZE: tl.constexpr, HAS_SOURCE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # batch * n_out + j
    column_block = tl.program_id(1)
    batch = row // n_out
    token = batch * n_tokens + tl.load(index_ptr + row).to(tl.int64)
    columns = column_block * BLOCK + tl.arange(0, BLOCK)
    mask_x = columns < channels
    values = tl.load(x_ptr + token * channels + columns, mask=mask_x)
    tl.store(x_out_ptr + row * channels + columns, values, mask=mask_x)
    if HAS_SOURCE:
        mask_source = columns < source_width
        source = tl.load(source_ptr + token * source_width + columns, mask=mask_source)
        tl.store(source_out_ptr + row * source_width + columns, source, mask=mask_source)
    if HAS_SIZE:
        tl.store(size_out_ptr + row, tl.load(size_ptr + token), mask=column_block == 0)


def gather_tokens_triton(
    x: Tensor, index: Tensor, size: Tensor | None, source: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gather rows of ``x`` (B, N, C), ``size`` (B, N) and ``source`` (B, N, K) by ``index`` (B, M)."""
    batch, n_tokens, channels = x.shape
    _dispatch.check_index(index, "index", batch, n_tokens)
    _dispatch.check_shape(size, "size", (batch, n_tokens))
    if source is not None:
        _dispatch.check_shape(source, "source", (batch, n_tokens, source.shape[-1]))
    n_out = index.shape[1]
    source_width = 0 if source is None else source.shape[-1]
    device = x.device
    x_out = _dispatch.new_output((batch, n_out, channels), x.dtype, device)
    size_out = None if size is None else _dispatch.new_output((batch, n_out), size.dtype, device)
    source_out = None
    if source is not None:
        source_out = _dispatch.new_output((batch, n_out, source_width), source.dtype, device)
    widest = max(channels, source_width)
    if batch * n_out == 0 or widest == 0:
        if size_out is not None and batch * n_out:  # no launch: the sizes are still the gathered ones
            size_out.copy_(torch.gather(size, 1, index))
        return x_out, size_out, source_out
    block = min(triton.next_power_of_2(widest), MAX_BLOCK)
    _gather_kernel[(batch * n_out, triton.cdiv(widest, block))](
        x.contiguous(), index.contiguous(), None if size is None else size.contiguous(),
        None if source is None else source.contiguous(), x_out, size_out, source_out,
        n_tokens, n_out, channels, source_width,
        HAS_SIZE=size is not None, HAS_SOURCE=source is not None, BLOCK=block,
    )
    return x_out, size_out, source_out
