"""Keeping per-token tensors of block extensions row-aligned with the token sequence.

Extensions hold per-token tensors from earlier blocks (adapter outputs, the patch-embedding stream,
earlier stage sums). When tokens are added later, those tensors get zero rows for them: tokens inserted
into the protected prefix go right after the old prefix, tokens added to the stream (CLCA's carriers and
re-injected cache) go at the end. All counts are Python ints, so shapes stay static.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effvision.tokens.state import TokenState


def align_rows(t: Tensor, t_prefix: int, num_tokens: int, num_prefix: int) -> Tensor:
    """Zero rows in ``t`` (B, N, C) for tokens added since it was computed: ``num_prefix - t_prefix``
    after its prefix, then up to ``num_tokens`` at the end."""
    inserted = num_prefix - t_prefix
    if inserted < 0:
        raise ValueError(f"the prefix shrank from {t_prefix} to {num_prefix} tokens")
    if inserted:
        zeros = t.new_zeros(t.shape[0], inserted, t.shape[2])
        t = torch.cat([t[:, :t_prefix], zeros, t[:, t_prefix:]], dim=1)
    missing = num_tokens - t.shape[1]
    if missing < 0:
        raise ValueError(f"a per-token tensor has {t.shape[1]} rows but the sequence only {num_tokens} tokens")
    if missing:
        t = torch.cat([t, t.new_zeros(t.shape[0], missing, t.shape[2])], dim=1)
    return t


def append_tokens(state: TokenState, tokens: Tensor) -> TokenState:
    """Append ``tokens`` (B, K, C) to the stream: reducible like patches, size 1, empty source row and, in
    RoPE models, no position (:data:`~effvision.tokens.state.NO_POSITION`: attention does not rotate them)."""
    from effvision.tokens.state import NO_POSITION

    batch, count = tokens.shape[:2]
    size = torch.cat([state.sizes(), state.sizes().new_ones(batch, count)], dim=1)
    source = state.source
    if source is not None:
        source = torch.cat([source, source.new_zeros(batch, count, source.shape[2])], dim=1)
    position = state.position
    if position is not None:
        position = torch.cat([position, position.new_full((batch, count), NO_POSITION)], dim=1)
    x = torch.cat([state.x, tokens.type_as(state.x)], dim=1)
    return state.replace(x=x, size=size, source=source, position=position)
