"""Token-reduction policies: per block, how many tokens go and which.

A policy is a small parameter-free object. ``output_tokens`` gives the static token schedule (the
same for every image, so export and CUDA graphs work); ``select`` turns the attention statistics of a
block into a token map. Policies:

* :class:`ToMePolicy`: bipartite soft matching (Bolya et al., ICLR 2023).
* :class:`PPTPolicy`: per layer and per image, prune inattentive tokens or pool duplicates
  (Wu et al., 2023, arXiv 2310.01812).
* :class:`TopKPolicy`: EViT top-k with a fused token (Liang et al., ICLR 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from effvision.tokens.attention import AttentionStatistics
from effvision.tokens.matching import (
    bipartite_soft_matching,
    fused_topk_count,
    prune_by_score,
    topk_with_fused_token,
)
from effvision.tokens.state import TokenState
from effvision.tokens.token_map import PerImageChoice, TokenMap

RSchedule = int | Sequence[int] | tuple[int, float]


def parse_r_schedule(r: RSchedule, depth: int) -> list[int]:
    """ToMe's r schedule: an int (same r every block), a per-block list, or ``(r, inflection)``.

    A list shorter than the model is padded with zeros. With ``(r, inflection)``, inflection in
    [-1, 1], the per-block r runs linearly from ``int(r * (1 - inflection))`` to ``2r`` minus that
    (truncated to int): 0 is constant, -1 ToMe's "decreasing schedule", +1 increasing.
    """
    if isinstance(r, bool):
        raise ValueError(f"r must be an int, a list of ints or (r, inflection), got {r!r}")
    if isinstance(r, int):
        schedule = [r] * depth
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], (int, float)) and isinstance(r[0], int):
        base, inflection = r
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"r inflection must be in [-1, 1], got {inflection}")
        first = int(base * (1.0 - inflection))
        last = 2 * base - first
        step = (last - first) / max(depth - 1, 1)
        schedule = [int(first + step * i) for i in range(depth)]
    elif isinstance(r, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in r):
        if len(r) > depth:
            raise ValueError(f"per-block r list has {len(r)} entries but the model has {depth} blocks")
        schedule = list(r) + [0] * (depth - len(r))
    else:
        raise ValueError(f"r must be an int, a list of ints or (r, inflection), got {r!r}")
    if any(v < 0 for v in schedule):
        raise ValueError(f"r must be >= 0, got {schedule}")
    return schedule


@dataclass
class ToMePolicy:
    """Merge ``r[i]`` tokens at every block ``i`` (capped at (N - P) // 2, as ToMe does)."""

    r: list[int]
    proportional_attention: bool = True
    name: str = "tome"
    needs: frozenset[str] = frozenset({"keys"})

    def removed(self, block: int, tokens: int, num_prefix: int) -> int:
        return min(self.r[block], (tokens - num_prefix) // 2)

    def output_tokens(self, block: int, tokens: int, num_prefix: int) -> int:
        return tokens - self.removed(block, tokens, num_prefix)

    def select(self, block: int, state: TokenState, stats: AttentionStatistics) -> TokenMap | None:
        r = self.removed(block, state.num_tokens, state.num_prefix)
        if r <= 0:
            return None
        return bipartite_soft_matching(stats.keys, state.sizes(), state.num_prefix, r)


def ppt_significance(stats: AttentionStatistics, num_prefix: int) -> torch.Tensor:
    """PPT token significance (B, N - P): CLS attention summed over heads times value norm, over
    patch tokens only, normalised to sum to one per image."""
    score = stats.cls_attention.sum(dim=1)[:, num_prefix:] * stats.value_norm[:, num_prefix:]
    return score / score.sum(dim=-1, keepdim=True)


@dataclass
class PPTPolicy:
    """PPT: at the blocks in ``layers`` remove ``r`` tokens per image, by pooling (ToMe matching) when
    the variance of the image's significance scores is below ``threshold`` (attention spread out:
    duplicates), by pruning the least significant tokens otherwise."""

    r: int = 50
    layers: tuple[int, ...] = (3, 6, 9)
    threshold: float = 7e-5
    proportional_attention: bool = True
    name: str = "ppt"
    needs: frozenset[str] = frozenset({"keys", "cls_attention", "value_norm"})

    def removed(self, block: int, tokens: int, num_prefix: int) -> int:
        if block not in self.layers:
            return 0
        return min(self.r, (tokens - num_prefix) // 2)

    def output_tokens(self, block: int, tokens: int, num_prefix: int) -> int:
        return tokens - self.removed(block, tokens, num_prefix)

    def use_pooling(self, significance: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where the image's score variance is below the threshold (pool)."""
        return significance.var(dim=-1) < self.threshold

    def select(self, block: int, state: TokenState, stats: AttentionStatistics) -> PerImageChoice | None:
        r = self.removed(block, state.num_tokens, state.num_prefix)
        if r <= 0:
            return None
        significance = ppt_significance(stats, state.num_prefix)
        pool = bipartite_soft_matching(stats.keys, state.sizes(), state.num_prefix, r)
        prune = prune_by_score(significance, state.num_prefix, significance.shape[1] - r)
        return PerImageChoice(pool, prune, self.use_pooling(significance))


@dataclass
class TopKPolicy:
    """EViT: at the blocks in ``layers`` keep ``ceil(keep_rate * (N - P))`` patch tokens by CLS
    attention (head mean) and fuse the others into one token."""

    keep_rate: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    proportional_attention: bool = False
    name: str = "topk"
    needs: frozenset[str] = field(default_factory=lambda: frozenset({"cls_attention"}))

    def output_tokens(self, block: int, tokens: int, num_prefix: int) -> int:
        if block not in self.layers:
            return tokens
        return num_prefix + fused_topk_count(tokens - num_prefix, self.keep_rate)

    def select(self, block: int, state: TokenState, stats: AttentionStatistics) -> TokenMap | None:
        if block not in self.layers or self.keep_rate >= 1.0:
            return None
        cls_attention = stats.cls_attention.mean(dim=1)[:, state.num_prefix:]
        return topk_with_fused_token(cls_attention, state.num_prefix, self.keep_rate)
