"""Run timm ViT blocks on a :class:`TokenState`, reducing tokens between attention and MLP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.hooks import BackwardHook

from effvision.tokens.attention import (
    AttentionStatistics,
    attention_with_statistics,
    check_attention_module,
    size_bias,
    timm_attention_forwards,
)
from effvision.tokens.state import TokenState
from effvision.tokens.token_map import PerImageChoice, TokenMap, apply_token_map

# timm's pre-norm ViT Block; EvaBlock has the same parts with LayerScale as gamma_1 / gamma_2
BLOCK_PARTS = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2")
LAYER_SCALES = (("ls1", "ls2"), ("gamma_1", "gamma_2"))


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
    """Raise ValueError unless ``block`` is a pre-norm timm ViT ``Block`` or ``EvaBlock`` (LayerScale allowed)."""
    missing = [name for name in BLOCK_PARTS if not hasattr(block, name)]
    if not any(all(hasattr(block, name) for name in scales) for scales in LAYER_SCALES):
        missing.append("ls1/ls2 or gamma_1/gamma_2")
    if missing:
        raise ValueError(
            f"block {index} ({type(block).__name__}) is not a pre-norm timm ViT Block (missing {missing}); "
            "token reduction supports timm's VisionTransformer Block and Eva's pre-norm EvaBlock"
        )
    if type(block).forward not in _known_block_forwards():  # the reduced blocks compute timm's forward themselves
        raise ValueError(
            f"block {index} ({type(block).__name__}) overrides forward(); token reduction recomputes timm's "
            "Block / EvaBlock forward from the block's parts, so what the override does would be lost"
        )


def _known_block_forwards() -> tuple[Callable, ...]:
    """The block forwards :class:`TokenReducingBlocks` reproduces (subclasses that keep them are fine)."""
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block

    return (Block.forward, EvaBlock.forward)


def layer_scale(block: nn.Module, branch: int, y: Tensor) -> Tensor:
    """The block's LayerScale of residual branch 1 (attention) or 2 (MLP): timm ``ls1``/``ls2`` modules,
    or Eva's ``gamma_1``/``gamma_2`` parameters (``None``: no scale)."""
    scale = getattr(block, f"ls{branch}", None)
    if scale is not None:
        return scale(y)
    gamma = getattr(block, f"gamma_{branch}", None)
    return y if gamma is None else gamma * y


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any forward or backward hook (its own or global ones)."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks or hooks._global_backward_pre_hooks
    )


def call_with_hooks(module: nn.Module, run: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``run(x)`` as if it were ``module(x)``: the module's (and global) forward pre-hooks, forward hooks
    and full backward hooks run as ``nn.Module.__call__`` runs them, with ``x`` as the input and the
    result as the output. Pre-hooks may replace the input and forward hooks the output."""
    hooks = nn.modules.module
    args, kwargs = (x,), {}
    for hook_id, hook in (*hooks._global_forward_pre_hooks.items(), *module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    full_backward_hooks, _ = module._get_backward_hooks()
    backward_pre_hooks = module._get_backward_pre_hooks()
    backward_hook = None
    if full_backward_hooks or backward_pre_hooks:
        backward_hook = BackwardHook(module, full_backward_hooks, backward_pre_hooks)
        args = backward_hook.setup_input_hook(args)
    output = run(args[0])
    for hook_id, hook in (*hooks._global_forward_hooks.items(), *module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs or hook_id in hooks._global_forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    if backward_hook is not None:
        output = backward_hook.setup_output_hook(output)
    return output


class TokenReducingBlocks(nn.Sequential):
    """Drop-in replacement for ``VisionTransformer.blocks``.

    Holds the very same block modules under the same names (``blocks.0.attn.qkv.weight`` ...), so state
    dicts and checkpoints of the base model load unchanged. Its ``forward`` takes and returns the token
    tensor like timm's ``nn.Sequential``; :meth:`forward_state` exposes the full :class:`TokenState`
    (sizes, source map). The policy is a plain, parameter-free object: no shared mutable state.
    Forward hooks on each block fire once per forward with the block's input and output tokens
    (:func:`call_with_hooks`). Slicing a prefix (``blocks[:k]``, as timm's ``prune_intermediate_layers``
    does) keeps the reduction.
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
        #: shapes of one image's forward inputs ((N, C) tokens[, RoPE table]), set by effvision.reduce: what
        #: TorchScript traces the blocks on (effvision.tokens.torchscript)
        self.example_shapes: tuple[tuple[int, ...], ...] = ()
        #: (method, options) the policy was made from, set by effvision.reduce
        self.reduction: tuple[str, dict] | None = None

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles for these blocks (in a torch.fx graph of the model): their
        forward traced in eval and in training mode (the reduction is Python;
        :mod:`effvision.tokens.torchscript`)."""
        from effvision.tokens.torchscript import traced_blocks_for_torchscript

        return traced_blocks_for_torchscript(self)

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

    def __getitem__(self, index):
        if not isinstance(index, slice):
            return super().__getitem__(index)
        start, stop, step = index.indices(len(self))
        if start != 0 or step != 1:
            raise ValueError(
                "a token-reduced model's blocks can only be sliced from the first block (blocks[:k]): the "
                "reduction schedule is indexed by block"
            )
        blocks = TokenReducingBlocks(list(self._modules.values())[:stop], self.policy, self.num_prefix,
                                     self.track_source)
        blocks.grad_checkpointing = self.grad_checkpointing
        blocks.extensions = self.extensions
        blocks.example_shapes = self.example_shapes
        blocks.reduction = self.reduction
        return blocks

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """(B, N, C) tokens (Eva: with its (N - prefix, D) RoPE table) -> what :meth:`output` gives."""
        return self.output(self.forward_state(TokenState.start(x, self.num_prefix, self.track_source, rope)))

    def output(self, state: TokenState) -> Tensor:
        """What ``forward`` returns for the final ``state``: the tokens, or an extension's output."""
        for extension in self.extensions:
            out = extension.output(state)
            if out is not None:
                return out
        return state.x

    def forward_state(self, state: TokenState) -> TokenState:
        for index, block in enumerate(self):
            state = self.run_block(index, block, state)
        return state

    def forward_intermediate_states(
        self, state: TokenState, indices: Iterable[int], stop_early: bool = False
    ) -> tuple[TokenState, list[TokenState]]:
        """Run the blocks; returns the final state and the state after each block in ``indices``
        (with ``stop_early``, the blocks after the last of them are skipped)."""
        indices = set(indices)
        last = max(indices) if stop_early and indices else len(self) - 1
        collected = []
        for index, block in enumerate(self):
            if index > last:
                break
            state = self.run_block(index, block, state)
            if index in indices:
                collected.append(state)
        return state, collected

    def run_block(self, index: int, block: nn.Module, state: TokenState) -> TokenState:
        """Block ``index`` on ``state``, between the extensions' ``before_block`` and ``after_block``.

        The block's hooks see its input and output tokens as in timm's loop: the input after what the
        extensions add between blocks (CLCA's cached tokens), the output before what they do after it
        (CLCA's head input, Sparse-Tuning's stage sums), so a forward hook that replaces the output
        replaces what the next block, the collector and the head get."""
        for extension in self.extensions:
            before = getattr(extension, "before_block", None)
            if before is not None:
                state = before(index, state)
        if has_hooks(block):
            result = {}

            def run(x: Tensor) -> Tensor:
                result["state"] = self.run_block_parts(index, block, state.replace(x=x))
                return result["state"].x

            x = call_with_hooks(block, run, state.x)
            state = result["state"].replace(x=x)
        else:
            state = self.run_block_parts(index, block, state)
        for extension in self.extensions:
            state = extension.after_block(index, state)
        return state

    def run_block_parts(self, index: int, block: nn.Module, state: TokenState) -> TokenState:
        """The block itself: attention, the policy's reduction, the extensions' reduction and parallel-FFN
        steps, the MLP."""
        reduces = self.policy.output_tokens(index, state.num_tokens, state.num_prefix) < state.num_tokens
        need = self.policy.needs if reduces else frozenset()
        bias = size_bias(state.size, state.x) if self.policy.proportional_attention else None
        rope = state.rope_embedding(index)
        num_prefix = state.num_prefix

        attn = block.attn
        if type(attn).forward not in timm_attention_forwards():  # replaced after the model was reduced
            check_attention_module(attn, f"blocks[{index}].attn: ")

        def attention_part(x: Tensor, bias: Tensor | None, rope: Tensor | None):
            found = {}

            def run(h: Tensor) -> Tensor:
                out, found["stats"] = attention_with_statistics(attn, h, bias, need, rope, num_prefix)
                return out

            h = block.norm1(x)  # hooks on the attention module see its input and output, as in timm's block
            out = call_with_hooks(attn, run, h) if has_hooks(attn) else run(h)
            return x + block.drop_path1(layer_scale(block, 1, out)), found["stats"]

        def mlp_part(x: Tensor) -> Tensor:
            return x + block.drop_path2(layer_scale(block, 2, block.mlp(block.norm2(x))))

        if self.grad_checkpointing and self.training:
            x, stats = torch.utils.checkpoint.checkpoint(attention_part, state.x, bias, rope, use_reentrant=False)
        else:
            x, stats = attention_part(state.x, bias, rope)
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
        return state.replace(x=x)
