"""How one reduction step maps N input tokens onto M output tokens.

A policy decides *which* tokens survive and where removed ones go; a token map records that decision
so it can be applied consistently to the features, the sizes, the source map and any other per-token
tensor (e.g. Dense-Adapter outputs of earlier layers in Sparse-Tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from effvision.kernels.token_gather import gather_tokens
from effvision.kernels.token_merge import merge_tokens


@dataclass
class TokenMap:
    """Output token ``j`` = ``keep_weight[j] * x[keep_index[j]] + sum(src_weight[s] * x[src_index[s]])``
    over the sources ``s`` with ``dst_index[s] == j`` (see :mod:`effvision.kernels.token_merge`).

    Shapes: ``keep_index`` / ``keep_weight`` (B, M); ``src_index`` / ``dst_index`` / ``src_weight``
    (B, S) or ``None`` for pure selection. Weights are ``None`` for all-ones.
    """

    keep_index: Tensor
    src_index: Tensor | None = None
    dst_index: Tensor | None = None
    keep_weight: Tensor | None = None
    src_weight: Tensor | None = None

    @property
    def num_outputs(self) -> int:
        return self.keep_index.shape[1]

    def features(self, t: Tensor) -> Tensor:
        """Apply the weighted map to a per-token tensor (B, N, C) -> (B, M, C)."""
        keep_weight = None if self.keep_weight is None else self.keep_weight.type_as(t)
        src_weight = None if self.src_weight is None else self.src_weight.type_as(t)
        return merge_tokens(t, self.keep_index, self.src_index, self.dst_index, keep_weight, src_weight)

    def sums(self, t: Tensor) -> Tensor:
        """Unweighted sum of everything landing on each output: sizes (B, N) and source maps (B, N, N0)."""
        if t.dim() == 2:
            return self.sums(t.unsqueeze(-1)).squeeze(-1)
        return merge_tokens(t, self.keep_index, self.src_index, self.dst_index)

    def representatives(self, t: Tensor) -> Tensor:
        """Per output token, the entry of the input token kept at its slot: (B, N) -> (B, M) (positions)."""
        return t.gather(1, self.keep_index)


@dataclass
class PerImageChoice:
    """Per image, one of two token maps with the same output count (PPT's prune-or-pool).

    ``use_first`` is a (B,) bool tensor. Both maps are applied to the whole batch and selected per
    image, so shapes stay static (export / CUDA graphs) while each image gets its own branch.
    """

    first: TokenMap
    second: TokenMap
    use_first: Tensor

    @property
    def num_outputs(self) -> int:
        return self.first.num_outputs

    def _select(self, a: Tensor, b: Tensor) -> Tensor:
        condition = self.use_first.view(-1, *([1] * (a.dim() - 1)))
        return torch.where(condition, a, b)

    def features(self, t: Tensor) -> Tensor:
        return self._select(self.first.features(t), self.second.features(t))

    def sums(self, t: Tensor) -> Tensor:
        return self._select(self.first.sums(t), self.second.sums(t))

    def representatives(self, t: Tensor) -> Tensor:
        return self._select(self.first.representatives(t), self.second.representatives(t))


def apply_token_map(state, token_map: TokenMap | PerImageChoice):
    """Reduce a :class:`~effvision.tokens.state.TokenState` with ``token_map``.

    A pure selection (pruning) moves tokens, sizes and source rows in one gather pass. Positions (RoPE
    models) follow each output token's representative (see :class:`~effvision.tokens.state.TokenState`).
    """
    position = None if state.position is None else token_map.representatives(state.position)
    if isinstance(token_map, TokenMap) and token_map.src_index is None and token_map.keep_weight is None:
        x, size, source = gather_tokens(state.x, token_map.keep_index, state.sizes(), state.source)
        return state.replace(x=x, size=size, source=source, position=position)
    size = token_map.sums(state.sizes())
    source = None if state.source is None else token_map.sums(state.source)
    return state.replace(x=token_map.features(state.x), size=size, source=source, position=position)
