"""Pure functions that decide a reduction step and return a :class:`TokenMap`.

All of them keep the ``num_prefix`` protected tokens first and untouched and produce the same number
of output tokens for every image of the batch (static shapes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from effvision.tokens.state import index_range
from effvision.tokens.token_map import TokenMap


def _prefix_index(batch: int, num_prefix: int, like: Tensor) -> Tensor:
    return index_range(0, num_prefix, 1, like).expand(batch, num_prefix)


def bipartite_soft_matching(metric: Tensor, sizes: Tensor, num_prefix: int, r: int) -> TokenMap:
    """ToMe bipartite soft matching (Bolya et al., ICLR 2023), as a size-weighted merge map.

    Tokens alternate into sets A (even sequence index) and B (odd); protected prefix tokens take part
    in neither. Each A token finds its most similar B token (cosine similarity of ``metric``); the
    ``r`` A tokens with the most similar matches merge into them (size-weighted average, sizes add).

    Args:
        metric: (B, N, c) similarity features (head-mean keys).
        sizes: (B, N) float token sizes.
        num_prefix: number of protected leading tokens.
        r: tokens to remove, at most the size of A.

    Output order: prefix tokens, unmerged A tokens, all B tokens (in sequence order). Unmerged A tokens come
    in sequence order when there are prefix tokens, else in descending order of their best match: the
    released ``bipartite_soft_matching`` sorts them only when there is a class token, and the next block's
    A/B split follows this order.
    """
    batch, tokens, _ = metric.shape
    a_positions = index_range(num_prefix + (num_prefix % 2), tokens, 2, metric)
    b_positions = index_range(num_prefix + 1 - (num_prefix % 2), tokens, 2, metric)
    if r > a_positions.numel():
        raise ValueError(f"cannot merge r={r} tokens: only {a_positions.numel()} tokens in set A")

    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, a_positions] @ metric[:, b_positions].transpose(-1, -2)  # (B, Na, Nb)
    best_score, best_b = scores.max(dim=-1)
    ranked = best_score.argsort(dim=-1, descending=True)
    merged_a = ranked[:, :r]
    unmerged_a = ranked[:, r:].sort(dim=-1).values if num_prefix else ranked[:, r:]

    num_unmerged = unmerged_a.shape[1]
    keep_index = torch.cat(
        [
            _prefix_index(batch, num_prefix, metric),
            a_positions[unmerged_a],
            b_positions.expand(batch, -1),
        ],
        dim=1,
    )
    src_index = a_positions[merged_a]
    dst_index = num_prefix + num_unmerged + best_b.gather(1, merged_a)

    plain = TokenMap(keep_index, src_index, dst_index)
    merged_size = plain.sums(sizes)
    keep_weight = sizes.gather(1, keep_index) / merged_size
    src_weight = sizes.gather(1, src_index) / merged_size.gather(1, dst_index)
    return TokenMap(keep_index, src_index, dst_index, keep_weight, src_weight)


def prune_by_score(scores: Tensor, num_prefix: int, num_keep: int) -> TokenMap:
    """Keep the prefix tokens and the ``num_keep`` patch tokens with the highest ``scores`` (B, N - P).

    Kept patch tokens come in descending score order; pruned tokens (and their sizes) are dropped.
    """
    batch = scores.shape[0]
    top = scores.topk(num_keep, dim=-1, sorted=True).indices + num_prefix
    keep_index = torch.cat([_prefix_index(batch, num_prefix, scores), top], dim=1)
    return TokenMap(keep_index)


def topk_with_fused_token(cls_attention: Tensor, num_prefix: int, keep_rate: float) -> TokenMap:
    """EViT (Liang et al., ICLR 2022): keep the top ``ceil(keep_rate * (N - P))`` patch tokens by
    CLS attention (B, N - P), and fuse the rest into one token, their attention-weighted sum.

    Output order: prefix, kept tokens (descending attention), fused token (last).
    """
    batch, patches = cls_attention.shape
    num_keep = math.ceil(keep_rate * patches)
    order = cls_attention.argsort(dim=-1, descending=True)
    top, rest = order[:, :num_keep], order[:, num_keep:]
    prefix = _prefix_index(batch, num_prefix, cls_attention)
    if rest.shape[1] == 0:
        return TokenMap(torch.cat([prefix, top + num_prefix], dim=1))
    rest_weight = cls_attention.gather(1, rest)
    fused_slot = num_prefix + num_keep
    keep_index = torch.cat([prefix, top + num_prefix, rest[:, :1] + num_prefix], dim=1)
    ones = rest_weight.new_ones(batch, num_prefix + num_keep)
    keep_weight = torch.cat([ones, rest_weight[:, :1]], dim=1)
    src_index = rest[:, 1:] + num_prefix
    dst_index = torch.full_like(src_index, fused_slot)
    return TokenMap(keep_index, src_index, dst_index, keep_weight, rest_weight[:, 1:])


def fused_topk_count(patches: int, keep_rate: float) -> int:
    """Patch tokens after :func:`topk_with_fused_token` (kept + fused), for static schedules."""
    kept = math.ceil(keep_rate * patches)
    return kept + (1 if kept < patches else 0)
