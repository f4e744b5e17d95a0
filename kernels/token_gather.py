"""Token gather: select kept tokens together with their sizes and source rows, in one pass.

Math (per batch row ``b``; ``index``: (B, M) int)::

    x_out[b, j]      = x[b, index[b, j]]          x: (B, N, C)
    size_out[b, j]   = size[b, index[b, j]]       size: (B, N) or (B, N, 1), optional
    source_out[b, j] = source[b, index[b, j]]     source: (B, N, K) (e.g. ToMe's source map), optional

Replaces the ``gather(index.unsqueeze(-1).expand(...))`` chains of pruning / top-k policies. The Triton
kernel (``_token_gather_triton``, imported on first use) copies all three in one launch; gradients of
the Triton path come from autograd through the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import fast_forward_reference_backward, resolve_backend


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    return torch.gather(t, 1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def gather_tokens_ref(
    x: Tensor, index: Tensor, size: Tensor | None = None, source: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """PyTorch reference of the token gather; ``size`` here is (B, N)."""
    x_out = _gather_rows(x, index)
    size_out = None if size is None else torch.gather(size, 1, index)
    source_out = None if source is None else _gather_rows(source, index)
    return x_out, size_out, source_out


def _gather_tokens_triton(*inputs: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    from ._token_gather_triton import gather_tokens_triton

    return gather_tokens_triton(*inputs)


def gather_tokens(
    x: Tensor,
    index: Tensor,
    size: Tensor | None = None,
    source: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gather kept tokens, sizes and source rows by ``index``; returns (x, size, source), ``None`` kept.

    ``size`` may be (B, N) or (B, N, 1) and comes back with the same rank. ``backend``: "auto" (Triton
    on CUDA tensors when Triton is importable, else PyTorch), "torch", or "triton" (CUDA tensors, or
    CPU tensors under ``TRITON_INTERPRET=1``).
    """
    size2d = size.squeeze(-1) if size is not None and size.dim() == 3 else size
    inputs = (x, index, size2d, source)
    if resolve_backend(backend, inputs, "gather_tokens") == "torch":
        x_out, size_out, source_out = gather_tokens_ref(*inputs)
    else:
        x_out, size_out, source_out = fast_forward_reference_backward(
            _gather_tokens_triton, gather_tokens_ref, *inputs
        )
    if size is not None and size.dim() == 3:
        size_out = size_out.unsqueeze(-1)
    return x_out, size_out, source_out
