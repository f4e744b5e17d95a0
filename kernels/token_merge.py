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
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def merge_tokens(
    x: Tensor,
    keep_index: Tensor,
    src_index: Tensor | None = None,
    dst_index: Tensor | None = None,
    keep_weight: Tensor | None = None,
    src_weight: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Weighted gather/merge of tokens; ``backend`` is "auto", "torch" or "triton"."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown or unavailable backend {backend!r} for merge_tokens")
    return merge_tokens_ref(x, keep_index, src_index, dst_index, keep_weight, src_weight)
