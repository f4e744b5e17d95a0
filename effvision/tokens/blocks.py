"""Run timm ViT blocks on a :class:`TokenState`, reducing tokens between attention and MLP."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch.utils.checkpoint
from torch import Tensor, nn

from effvision.tokens.attention import AttentionStatistics, attention_with_statistics, size_bias
from effvision.tokens.state import TokenState
from effvision.tokens.token_map import PerImageChoice, TokenMap, apply_token_map

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class ReductionPolicy(Protocol):
    name: str
    needs: frozenset[str]
    proportional_attention: bool

    def output_tokens(self, block: int, tokens: int, num_prefix: int) -> int: ...

    def select(
        self, block: int, state: TokenState, stats: AttentionStatistics
    ) -> TokenMap | PerImageChoice | None: ...


class BlockExtension(Protocol):
    """Adds work around the blocks (Sparse-Tuning's Dense Adapters, CLCA's cache and head input).

    Hooks run in the order of ``TokenReducingBlocks.extensions``; each gets and returns the
    :class:`TokenState`, keeping per-forward data in ``state.extras`` (never on the module).

    * ``injected_tokens(block)``: tokens appended right after the reduction of ``block`` (static).
    * ``after_reduction(block, state, token_map)``: after the policy's map (``None``: no reduction).
    * ``parallel_ffn(block, state)``: (state, branch) where ``branch`` (B, N, C) or ``None`` is added
      to the residual beside the MLP.
    * ``after_block(block, state)``: after the MLP.
    * ``output(state)``: a tensor to return from ``forward`` instead of the tokens, or ``None``.

    Optional (looked up with ``getattr``, so extensions without them need not define them):

    * ``before_block(block, state)``: before the block's attention (e.g. tokens added to the input).
    * ``tokens_before_block(block)``: (stream tokens, protected tokens) that ``before_block`` adds
      (static). Protected tokens join the prefix (inserted after it; policies never remove them).
    """

    def injected_tokens(self, block: int) -> int: ...

    def after_reduction(
        self, block: int, state: TokenState, token_map: TokenMap | PerImageChoice | None
    ) -> TokenState: ...

    def parallel_ffn(self, block: int, state: TokenState) -> tuple[TokenState, Tensor | None]: ...

    def after_block(self, block: int, state: TokenState) -> TokenState: ...

    def output(self, state: TokenState) -> Tensor | None: ...


@dataclass
class NoReduction:
    """The identity policy: every block keeps all tokens."""

    name: str = "none"
    needs: frozenset[str] = field(default_factory=frozenset)
    proportional_attention: bool = False

    def output_tokens(self, block: int, tokens: int, num_prefix: int) -> int:
        return tokens

    def select(self, block: int, state: TokenState, stats: AttentionStatistics) -> None:
        return None


def check_block(block: nn.Module, index: int) -> None:
    """Raise ValueError unless ``block`` is a pre-norm timm ViT ``Block`` (LayerScale allowed)."""
    missing = [name for name in BLOCK_PARTS if not hasattr(block, name)]
    if missing:
        raise ValueError(
            f"block {index} ({type(block).__name__}) is not a pre-norm timm ViT Block (missing {missing}); "
            "token reduction supports timm's VisionTransformer Block"
        )


class TokenReducingBlocks(nn.Sequential):
    """Drop-in replacement for ``VisionTransformer.blocks``.

    Holds the very same block modules under the same names (``blocks.0.attn.qkv.weight`` ...), so state
    dicts and checkpoints of the base model load unchanged. Its ``forward`` takes and returns the token
    tensor like timm's ``nn.Sequential``; :meth:`forward_state` exposes the full :class:`TokenState`
    (sizes, source map). The policy is a plain, parameter-free object: no shared mutable state.
    ``extensions`` (a tuple, not registered as sub-modules: extension modules are registered on the
    model under their own names) hook into every block, see :class:`BlockExtension`.
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        policy: ReductionPolicy,
        num_prefix: int,
        track_source: bool = False,
    ) -> None:
        super().__init__(*blocks)
        for index, block in enumerate(self):
            check_block(block, index)
        self.policy = policy
        self.num_prefix = num_prefix
        self.track_source = track_source
        self.grad_checkpointing = False
        self.extensions: tuple[BlockExtension, ...] = ()

    def token_schedule(self, tokens: int) -> list[tuple[int, int]]:
        """(tokens into attention, tokens into the MLP) for every block, for ``tokens`` input tokens."""
        schedule, prefix = [], self.num_prefix
        for index in range(len(self)):
            for extension in self.extensions:
                added = getattr(extension, "tokens_before_block", None)
                if added is not None:
                    stream, protected = added(index)
                    tokens, prefix = tokens + stream + protected, prefix + protected
            out = self.policy.output_tokens(index, tokens, prefix)
            out += sum(extension.injected_tokens(index) for extension in self.extensions)
            schedule.append((tokens, out))
            tokens = out
        return schedule

    def forward(self, x: Tensor) -> Tensor:
        state = self.forward_state(TokenState.start(x, self.num_prefix, self.track_source))
        for extension in self.extensions:
            out = extension.output(state)
            if out is not None:
                return out
        return state.x

    def forward_state(self, state: TokenState) -> TokenState:
        for index, block in enumerate(self):
            state = self.run_block(index, block, state)
        return state

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> TokenState:
        for extension in self.extensions:
            before = getattr(extension, "before_block", None)
            if before is not None:
                state = before(index, state)
        reduces = self.policy.output_tokens(index, state.num_tokens, state.num_prefix) < state.num_tokens
        need = self.policy.needs if reduces else frozenset()
        bias = size_bias(state.size, state.x.dtype) if self.policy.proportional_attention else None

        def attention_part(x: Tensor, bias: Tensor | None):
            out, stats = attention_with_statistics(block.attn, block.norm1(x), bias, need)
            return x + block.drop_path1(block.ls1(out)), stats

        def mlp_part(x: Tensor) -> Tensor:
            return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

        if self.grad_checkpointing and self.training:
            x, stats = torch.utils.checkpoint.checkpoint(attention_part, state.x, bias, use_reentrant=False)
        else:
            x, stats = attention_part(state.x, bias)
        state = state.replace(x=x)
        token_map = self.policy.select(index, state, stats) if reduces else None
        if token_map is not None:
            state = apply_token_map(state, token_map)
        branches = []
        for extension in self.extensions:
            state = extension.after_reduction(index, state, token_map)
        for extension in self.extensions:
            state, branch = extension.parallel_ffn(index, state)
            if branch is not None:
                branches.append(branch)
        if self.grad_checkpointing and self.training:
            x = torch.utils.checkpoint.checkpoint(mlp_part, state.x, use_reentrant=False)
        else:
            x = mlp_part(state.x)
        for branch in branches:
            x = x + branch
        state = state.replace(x=x)
        for extension in self.extensions:
            state = extension.after_block(index, state)
        return state
