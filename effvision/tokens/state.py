"""The token state that flows through a token-reduced ViT's blocks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

#: the ``position`` of a token added after the input (CLCA's carriers and re-injected cache): it holds no
#: patch, so RoPE attention leaves it unrotated, as it leaves prefix tokens
NO_POSITION = -1


def index_range(start: int, stop: int, step: int, like: Tensor) -> Tensor:
    """``torch.arange(start, stop, step)`` (int64) on the device of ``like``, built from ``like.new_ones`` so
    that a TorchScript trace follows the device of its input: ``arange(..., device=x.device)`` is kept in a
    trace as a constant, and a script module moved to another device would still make its indices there."""
    count = len(range(start, stop, step))
    return start + step * (like.new_ones(count, dtype=torch.long).cumsum(0) - 1)


@dataclass
class TokenState:
    """Tokens of a batch between two transformer blocks.

    Attributes:
        x: token features, (B, N, C). The first ``num_prefix`` tokens (CLS, distillation, register
            tokens) are protected: policies never remove or merge them and keep them in front.
        size: how many original patches each token stands for, (B, N) float32, or ``None`` while
            every token is still one patch (this keeps the unreduced model bit-identical to timm).
        source: optional source map (B, N, N0): ``source[b, i, j] = 1`` when token ``i`` holds
            original token ``j``.
        num_prefix: number of protected prefix tokens.
        position: (B, N) int64, for models with rotary position embeddings (RoPE): the original token
            whose position each token carries, or ``None``. A token keeps the position of its
            *representative*, the input token a token map keeps at its slot (``TokenMap.keep_index``):
            a kept token keeps its own position, a ToMe-merged token that of the token it merged into,
            EViT's fused token that of the most attended of the tokens it fuses.
        rope: the model's RoPE table for the original patch grid as timm computes it, (N0 - P, D), or
            (depth, heads, N0 - P, D) for timm's "mixed" RoPE (one table per block); ``None`` without RoPE.
        extras: per-forward data of block extensions (e.g. earlier Dense-Adapter outputs, the CLCA
            cache), created fresh for every call. Extensions never mutate it in place; they return
            ``state.replace(extras={**state.extras, key: value})``.
    """

    x: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    num_prefix: int = 1
    position: Tensor | None = None
    rope: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls, x: Tensor, num_prefix: int, track_source: bool = False, rope: Tensor | None = None
    ) -> TokenState:
        """State at the first block: every token is itself (size 1, identity source map, own position)."""
        batch, tokens = x.shape[:2]
        source = position = None
        if track_source:
            source = torch.diag_embed(x.new_ones(tokens, dtype=torch.float32)).expand(batch, -1, -1)
        if rope is not None:
            position = index_range(0, tokens, 1, x).expand(batch, -1)
        return cls(x=x, size=None, source=source, num_prefix=num_prefix, position=position, rope=rope)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def sizes(self) -> Tensor:
        """Token sizes as a (B, N) float32 tensor (ones when not tracked yet)."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[:2], dtype=torch.float32)

    def rope_embedding(self, block: int) -> Tensor | None:
        """RoPE of the patch tokens at ``block``: (B, 1, N - P, D), or (B, heads, N - P, D) for mixed
        RoPE; each token takes the row of the original patch it carries the position of."""
        if self.rope is None:
            return None
        position = self.position[:, self.num_prefix:]
        table = self.rope if self.rope.dim() == 2 else self.rope[block]  # ([heads,] patches, D)
        table = table.reshape(-1, *table.shape[-2:])  # (1 or heads, patches, D)
        patches = table.shape[1]
        # tokens with no position take an extra identity row (timm's layout: sin half 0, cos half 1)
        identity = torch.cat([table.new_zeros(table.shape[0], 1, table.shape[2] // 2),
                              table.new_ones(table.shape[0], 1, table.shape[2] - table.shape[2] // 2)], dim=2)
        table = torch.cat([table, identity], dim=1)
        index = torch.where(position == NO_POSITION, patches, position - self.num_prefix)  # (B, N - P)
        batch, tokens = index.shape
        heads, _, dim = table.shape
        rows = index[:, None, :, None].expand(batch, heads, tokens, dim)
        return table.unsqueeze(0).expand(batch, -1, -1, -1).gather(2, rows)

    def replace(self, **changes) -> TokenState:
        return replace(self, **changes)
