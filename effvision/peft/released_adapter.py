"""Sparse-Tuning's adapters as the authors' released image-classification code computes them.

Per block, one adapter reads the block's residual stream after attention and token sparsification
(not ``norm2(x)``) and its output is added beside the frozen MLP::

    h = ReLU(down1(x))              dim -> bottleneck          (768 -> 64)
    s = down2(h)                    bottleneck -> inner        (64 -> 32)
    t = up1(s)                      inner -> bottleneck        (32 -> 64)
    a = up2(down3([s; t]) + h)      bottleneck + inner -> bottleneck -> dim

Across blocks the outputs are also summed per stage and added to the stream after the stage's last
block: after the first stage the patch-embedding stream (the input of block 0) plus the adapter
outputs of that stage; after every later stage the adapter outputs of its blocks. The model's last
block's adapter is left out of the last stage's sum, as in the release (``sum_last_block=True``
includes it). Stages start at the sparsifying blocks (3, 6, 9 of ViT-B), so a stage's tensors share
its token set; with other schedules (ToMe reduces every block) the stored tensors follow each token
map like the tokens themselves. Weights are initialised N(0, 0.02), biases zero, as the released
model's initialisation leaves them: the adapters change the output from the first step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effvision.peft.token_rows import align_rows
from effvision.tokens.state import TokenState
from effvision.tokens.token_map import PerImageChoice, TokenMap

STAGE_KEY = "released_adapter_stage"  # (prefix count, tuple of per-token tensors summed at the stage end)
INIT_STD = 0.02


class ReleasedAdapter(nn.Module):
    """One adapter, (B, N, dim) -> (B, N, dim); see the module docstring for the computation."""

    def __init__(self, dim: int, bottleneck: int = 64, inner: int = 32) -> None:
        super().__init__()
        if bottleneck < 1 or inner < 1:
            raise ValueError(f"adapter widths must be >= 1, got bottleneck={bottleneck}, inner={inner}")
        self.down1 = nn.Linear(dim, bottleneck)
        self.down2 = nn.Linear(bottleneck, inner)
        self.up1 = nn.Linear(inner, bottleneck)
        self.down3 = nn.Linear(bottleneck + inner, bottleneck)
        self.up2 = nn.Linear(bottleneck, dim)
        for linear in self.linears():
            nn.init.normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)

    def linears(self) -> list[nn.Linear]:
        return [self.down1, self.down2, self.up1, self.down3, self.up2]

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.down1(x))
        s = self.down2(h)
        t = self.up1(s)
        return self.up2(self.down3(torch.cat([s, t], dim=-1)) + h)

    def macs_per_token(self) -> int:
        return sum(linear.in_features * linear.out_features for linear in self.linears())


class ReleasedAdapters(nn.Module):
    """The adapters of every block plus the per-stage sums, as a block extension.

    Registered on the model as ``dense_adapters`` (``dense_adapters.adapters.3.down1.weight`` ...).

    Args:
        dim: token width.
        depth: number of blocks.
        stage_starts: first block of every stage after the first (the sparsifying blocks).
        bottleneck, inner: adapter widths (64 and 32 in the release).
        sum_last_block: add the last block's adapter output to the last stage's sum too.
    """

    #: ``adapters.<i>`` belongs to block i (timm's group_matcher / layer-wise lr decay, see effvision.tokens.model)
    per_block_modules = "adapters"

    def __init__(
        self,
        dim: int,
        depth: int,
        stage_starts: tuple[int, ...],
        bottleneck: int = 64,
        inner: int = 32,
        sum_last_block: bool = False,
    ) -> None:
        super().__init__()
        starts = sorted({int(start) for start in stage_starts})
        if not all(0 < start < depth for start in starts):
            raise ValueError(f"stage starts {tuple(starts)} must lie in 1..{depth - 1}")
        self.adapters = nn.ModuleList(ReleasedAdapter(dim, bottleneck, inner) for _ in range(depth))
        self.stage_ends = (*(start - 1 for start in starts), depth - 1)
        self.sum_last_block = sum_last_block
        self.bottleneck = bottleneck

    @staticmethod
    def _stage(state: TokenState) -> tuple[int, tuple[Tensor, ...]]:
        return state.extras.get(STAGE_KEY, (state.num_prefix, ()))

    @staticmethod
    def _aligned(state: TokenState) -> tuple[Tensor, ...]:
        prefix, tensors = ReleasedAdapters._stage(state)
        return tuple(align_rows(t, prefix, state.num_tokens, state.num_prefix) for t in tensors)

    def _with_stage(self, state: TokenState, tensors: tuple[Tensor, ...]) -> TokenState:
        return state.replace(extras={**state.extras, STAGE_KEY: (state.num_prefix, tensors)})

    def injected_tokens(self, block: int) -> int:
        return 0

    def before_block(self, block: int, state: TokenState) -> TokenState:
        if block == 0:  # the first stage's sum starts with the patch-embedding stream
            return self._with_stage(state, (state.x,))
        return self._with_stage(state, self._aligned(state))

    def after_reduction(self, block: int, state: TokenState, token_map: TokenMap | PerImageChoice | None) -> TokenState:
        prefix, tensors = self._stage(state)
        if token_map is None or not tensors:
            return state
        # the map's input rows are the tokens before the reduction (aligned in before_block)
        return self._with_stage(state, tuple(token_map.features(t) for t in tensors))

    def parallel_ffn(self, block: int, state: TokenState) -> tuple[TokenState, Tensor]:
        branch = self.adapters[block](state.x)
        tensors = self._aligned(state)
        if block < self.stage_ends[-1] or self.sum_last_block:  # the model's last block (also after pruning)
            tensors = (*tensors, branch)
        return self._with_stage(state, tensors), branch

    def after_block(self, block: int, state: TokenState) -> TokenState:
        if block not in self.stage_ends:
            return state
        tensors = self._aligned(state)
        x = state.x
        for t in tensors:
            x = x + t
        return self._with_stage(state.replace(x=x), ())

    def output(self, state: TokenState) -> None:
        return None

    def prune_blocks(self, depth: int):
        """After ``prune_intermediate_layers`` keeps the first ``depth`` blocks: drop the adapters of the others
        (never called again, so their parameters would get no gradient). Returns this extension."""
        self.adapters = self.adapters[:depth]
        return self

    def macs(self, schedule: list[tuple[int, int]]) -> int:
        """Adapter MACs per image: each adapter runs at its block's MLP token count (the stage sums are
        additions, not counted)."""
        return sum(
            tokens * adapter.macs_per_token() for adapter, (_, tokens) in zip(self.adapters, schedule, strict=True)
        )
