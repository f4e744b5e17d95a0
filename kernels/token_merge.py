"""Weighted token gather/merge: the data movement of every token-reduction policy.

Math (per batch row ``b``; ``x``: (B, N, C); output: (B, M, C))::

    out[b, j] = keep_weight[b, j] * x[b, keep_index[b, j]]
              + sum_{s : dst_index[b, s] == j} src_weight[b, s] * x[b, src_index[b, s]]

* pruning / top-k: ``keep_index`` only (a gather),
* ToMe / PPT pooling: ``keep_index`` = surviving tokens, ``src_index -> dst_index`` = merged tokens,
  weights = size / merged size (a size-weighted average),
* EViT fused token: one output slot fed by the dropped tokens with their attention weights.

Index tensors are int64; weights share ``x``'s dtype or are ``None`` (all ones). Many sources may land
on one destination; sums are accumulated in a fixed order (deterministic).

``size_weighted_merge`` is the fused ToMe form: with token sizes ``size`` (B, N),
``new_size[j] = size[keep[j]] + sum_{s -> j} size[src[s]]`` and
``out[j] = (size * x)[keep[j]] + sum_{s -> j} (size * x)[src[s]]) / new_size[j]``, in one kernel.

The Triton kernels (``_token_merge_triton``, imported on first use) accumulate in fp32; gradients of
the Triton path come from autograd through the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import fast_forward_reference_backward, resolve_backend


def merge_tokens_ref(
    x: Tensor,
    keep_index: Tensor,
    src_index: Tensor | None = None,
    dst_index: Tensor | None = None,
    keep_weight: Tensor | None = None,
    src_weight: Tensor | None = None,
) -> Tensor:
    """PyTorch reference of the weighted gather/merge (see module docstring). Exportable to ONNX."""
    channels = x.shape[-1]
    out = torch.gather(x, 1, keep_index.unsqueeze(-1).expand(-1, -1, channels))
    if keep_weight is not None:
        out = out * keep_weight.unsqueeze(-1)
    if src_index is None or src_index.shape[1] == 0:
        return out
    src = torch.gather(x, 1, src_index.unsqueeze(-1).expand(-1, -1, channels))
    if src_weight is not None:
        src = src * src_weight.unsqueeze(-1)
    return out.scatter_add(1, dst_index.unsqueeze(-1).expand(-1, -1, channels), src)


def size_weighted_merge_ref(
    x: Tensor, size: Tensor, keep_index: Tensor, src_index: Tensor, dst_index: Tensor
) -> tuple[Tensor, Tensor]:
    """PyTorch reference of the size-weighted merge; ``size`` is (B, N). Returns (merged, merged_size)."""
    accumulate = torch.promote_types(x.dtype, torch.float32)  # float32 for half types, float64 kept
    size_acc = size.to(accumulate)
    source_size = torch.gather(size_acc, 1, src_index)
    merged_size = torch.gather(size_acc, 1, keep_index).scatter_add(1, dst_index, source_size)
    merged = merge_tokens_ref(x.to(accumulate) * size_acc.unsqueeze(-1), keep_index, src_index, dst_index)
    return (merged / merged_size.unsqueeze(-1)).to(x.dtype), merged_size.to(size.dtype)


def _merge_tokens_ref_tuple(*inputs: Tensor | None) -> tuple[Tensor]:
    return (merge_tokens_ref(*inputs),)


def _merge_tokens_triton_tuple(*inputs: Tensor | None) -> tuple[Tensor]:
    from ._token_merge_triton import merge_tokens_triton

    return (merge_tokens_triton(*inputs),)


def merge_tokens(
    x: Tensor,
    keep_index: Tensor,
    src_index: Tensor | None = None,
    dst_index: Tensor | None = None,
    keep_weight: Tensor | None = None,
    src_weight: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Weighted gather/merge of tokens (see module docstring).

    ``backend``: "auto" (Triton on CUDA tensors when Triton is importable, else PyTorch), "torch", or
    "triton" (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
    """
    if (src_index is None) != (dst_index is None):
        raise ValueError("src_index and dst_index go together: pass both or neither")
    inputs = (x, keep_index, src_index, dst_index, keep_weight, src_weight)
    if resolve_backend(backend, inputs, "merge_tokens") == "torch":
        return merge_tokens_ref(*inputs)
    return fast_forward_reference_backward(_merge_tokens_triton_tuple, _merge_tokens_ref_tuple, *inputs)[0]


def _size_weighted_merge_triton(*inputs: Tensor) -> tuple[Tensor, Tensor]:
    from ._token_merge_triton import size_weighted_merge_triton

    return size_weighted_merge_triton(*inputs)


def size_weighted_merge(
    x: Tensor,
    size: Tensor,
    keep_index: Tensor,
    src_index: Tensor,
    dst_index: Tensor,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """ToMe's size-weighted average merge; returns (merged (B, M, C), merged sizes).

    ``size`` is (B, N) or (B, N, 1); the merged sizes come back with the same rank and dtype.
    ``backend`` as in ``merge_tokens``.
    """
    size2d = size.squeeze(-1) if size.dim() == 3 else size
    inputs = (x, size2d, keep_index, src_index, dst_index)
    if resolve_backend(backend, inputs, "size_weighted_merge") == "torch":
        merged, merged_size = size_weighted_merge_ref(*inputs)
    else:
        merged, merged_size = fast_forward_reference_backward(
            _size_weighted_merge_triton, size_weighted_merge_ref, *inputs
        )
    return merged, merged_size.unsqueeze(-1) if size.dim() == 3 else merged_size
