"""The token state that flows through a token-reduced ViT's blocks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


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
        extras: per-forward data of block extensions (e.g. earlier Dense-Adapter outputs, the CLCA
            cache), created fresh for every call. Extensions never mutate it in place; they return
            ``state.replace(extras={**state.extras, key: value})``.
    """

    x: Tensor
    size: Tensor | None = None
    source: Tensor | None = None
    num_prefix: int = 1
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, track_source: bool = False) -> TokenState:
        """State at the first block: every token is itself (size 1, identity source map)."""
        source = None
        if track_source:
            batch, tokens = x.shape[:2]
            source = torch.eye(tokens, device=x.device, dtype=torch.float32).expand(batch, -1, -1)
        return cls(x=x, size=None, source=source, num_prefix=num_prefix)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def sizes(self) -> Tensor:
        """Token sizes as a (B, N) float32 tensor (ones when not tracked yet)."""
        if self.size is not None:
            return self.size
        return torch.ones(self.x.shape[:2], device=self.x.device, dtype=torch.float32)

    def replace(self, **changes) -> TokenState:
        return replace(self, **changes)
