"""Token-reduction policies: per block, how many tokens go and which.

A policy is a small parameter-free object. ``output_tokens`` gives the static token schedule (the
same for every image, so export and CUDA graphs work); ``select`` turns the attention statistics of a
block into a token map. Policies:

* :class:`ToMePolicy`: bipartite soft matching (Bolya et al., ICLR 2023).
* :class:`PPTPolicy`: per layer and per image, prune inattentive tokens or pool duplicates
  (Wu et al., 2023, arXiv 2310.01812).
* :class:`TopKPolicy`: EViT top-k with a fused token (Liang et al., ICLR 2022).

Each is built from one table, :data:`POLICIES`: per method its options with their defaults (paper
values, scaled to the model's depth and patch count) and validation; :func:`make_policy` reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from effvision.tokens.attention import AttentionStatistics
from effvision.tokens.blocks import NoReduction
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
        if significance.shape[0] == 0:  # torch warns on var() of an empty batch
            return significance.new_zeros(0, dtype=torch.bool)
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


# ---------------------------------------------------------------- the policy table


@dataclass(frozen=True)
class ModelShape:
    """What option defaults and checks need to know about a ViT."""

    depth: int
    patches: int
    num_prefix: int
    has_class_token: bool


@dataclass(frozen=True)
class Option:
    """One method option: ``default(shape)`` when not given; ``check(value, shape)`` (given or default)
    returns the normalised value or raises ValueError."""

    default: Callable[[ModelShape], Any]
    check: Callable[[Any, ModelShape], Any]
    doc: str


@dataclass(frozen=True)
class PolicySpec:
    """A reduction method: its policy class, options and whether it scores tokens by CLS attention."""

    policy: Callable[..., Any]
    options: dict[str, Option]
    needs_class_token: bool
    doc: str


def default_layers(depth: int) -> tuple[int, ...]:
    """Reduction blocks at a quarter, half and three quarters of the depth: (3, 6, 9) for 12 blocks."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def scaled_to_patches(r_at_196: int) -> Callable[[ModelShape], int]:
    """A paper default given for 196 patches (224 px / 16), scaled to the model's patch count."""
    return lambda shape: max(1, round(r_at_196 * shape.patches / 196))


def default_tome_r(shape: ModelShape) -> int:
    """ToMe's off-the-shelf r: 13 for 12-block models (8 for 24 blocks) at 196 patches, scaled to the patches."""
    return scaled_to_patches(13 if shape.depth <= 12 else 8)(shape)


def check_tome_r(r: RSchedule, shape: ModelShape) -> list[int]:
    schedule = parse_r_schedule(r, shape.depth)
    if max(schedule, default=0) > shape.patches // 2:
        raise ValueError(
            f"r={max(schedule)} too large: bipartite matching removes at most {shape.patches // 2} of the "
            f"{shape.patches} patch tokens per block"
        )
    return schedule


def check_ppt_r(r: Any, shape: ModelShape) -> int:
    if not _is_int(r) or r < 0:
        raise ValueError(f"ppt r must be a non-negative int, got {r!r}")
    r = int(r)
    if r > shape.patches // 2:
        raise ValueError(
            f"r={r} too large: PPT removes at most (N-1)//2 = {shape.patches // 2} of the {shape.patches} patch tokens"
        )
    return r


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_layers(layers: Any, shape: ModelShape) -> tuple[int, ...]:
    if isinstance(layers, np.ndarray) and layers.ndim == 1:
        layers = list(layers)  # a sweep's integer array: its items are numpy ints
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(map(_is_int, layers)):
        # int() would have taken 3.7 as block 3 and "36" as blocks 3 and 6
        raise ValueError(f"reduction layers must be a list of block indices (ints), got {layers!r}")
    layers = tuple(int(layer) for layer in layers)
    bad = [layer for layer in layers if not 0 <= layer < shape.depth]
    if bad:
        raise ValueError(
            f"reduction layers {bad} out of range for a model with {shape.depth} blocks (0..{shape.depth - 1})"
        )
    return layers


def check_threshold(threshold: Any, shape: ModelShape) -> float:
    if not _is_real(threshold):
        raise ValueError(f"ppt threshold must be a number >= 0, got {threshold!r}")
    threshold = float(threshold)
    if not threshold >= 0:  # also NaN, which would make every comparison False (always prune, silently)
        raise ValueError(f"ppt threshold must be a number >= 0, got {threshold}")
    return threshold


def check_keep_rate(keep_rate: Any, shape: ModelShape) -> float:
    if not _is_real(keep_rate):
        raise ValueError(f"topk keep_rate must be a number in (0, 1], got {keep_rate!r}")
    keep_rate = float(keep_rate)
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"topk keep_rate must be in (0, 1], got {keep_rate}")
    return keep_rate


def check_bool(value: Any, shape: ModelShape) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected True or False, got {value!r}")
    return value


def _proportional_attention(default: bool) -> Option:
    return Option(lambda shape: default, check_bool, "add log(token size) to the attention logits")


LAYERS = Option(
    lambda shape: default_layers(shape.depth), check_layers, "blocks that reduce (default: depth/4, depth/2, 3*depth/4)"
)

POLICIES: dict[str, PolicySpec] = {
    "ppt": PolicySpec(
        PPTPolicy,
        {
            "r": Option(scaled_to_patches(50), check_ppt_r, "tokens removed per reducing block (50 at 196 patches)"),
            "layers": LAYERS,
            "threshold": Option(lambda shape: 7e-5, check_threshold, "score variance below which an image pools"),
            "proportional_attention": _proportional_attention(True),
        },
        needs_class_token=True,
        doc="per image: pool (ToMe matching) or prune r tokens, by the variance of token significance",
    ),
    "tome": PolicySpec(
        ToMePolicy,
        {
            "r": Option(default_tome_r, check_tome_r, "tokens merged per block: int, list or (r, inflection)"),
            "proportional_attention": _proportional_attention(True),
        },
        needs_class_token=False,
        doc="bipartite soft matching on head-mean keys, size-weighted merge, every block",
    ),
    "topk": PolicySpec(
        TopKPolicy,
        {
            "keep_rate": Option(lambda shape: 0.7, check_keep_rate, "fraction of patch tokens kept"),
            "layers": LAYERS,
            "proportional_attention": _proportional_attention(False),
        },
        needs_class_token=True,
        doc="EViT: keep the top tokens by CLS attention, fuse the rest into one token",
    ),
    "none": PolicySpec(NoReduction, {}, needs_class_token=False, doc="no reduction"),
}


def make_policy(method: str, shape: ModelShape, **options):
    """The policy of ``method`` for a model of ``shape``: :data:`POLICIES` defaults overridden by ``options``."""
    if not isinstance(method, str) or method not in POLICIES:
        raise ValueError(f"unknown token-reduction method {method!r}; choose one of {', '.join(POLICIES)}")
    spec = POLICIES[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = ", ".join(spec.options) or "no options"
        raise ValueError(f"{method} takes {takes}, not {', '.join(unknown)}")
    if spec.needs_class_token and not shape.has_class_token:
        raise ValueError(f"method {method!r} scores tokens by CLS attention; this model has no class token")
    values = {
        name: option.check(options[name] if name in options else option.default(shape), shape)
        for name, option in spec.options.items()
    }
    return spec.policy(**values)
