"""Dense Adapters (Sparse-Tuning, Liu et al., arXiv 2405.14700), as we read the paper's figure.

``sparse_tuning(..., adapter="dense")``. The authors' released code computes something else (one input
per adapter, per-stage sums: :mod:`effvision.peft.released_adapter`, the default); this reading is kept
as an option. The adapter of block ``N`` sees three inputs, each through its own down-projection (dim -> r):

* ``x_N``: the block's tokens entering the FFN, i.e. after attention and after the token reduction.
  We feed the residual stream itself (not ``norm2(x)``), as the official Sparse-Tuning code does for
  its parallel adapter: the frozen FFN sees ``norm2(x)``, the adapter the raw residual tokens.
* ``a_{N-1}``: the previous adapter's output (N >= 1),
* ``a_{N-3}``: the output of the adapter three blocks earlier (N >= 3),

``a_N = W_up(ReLU(W_down1 x_N + W_down2 a_{N-1} + W_down3 a_{N-3}))`` with ``W_up`` zero-initialised,
added to the residual in parallel to the frozen FFN. Earlier outputs are per-token tensors that pass
through every token map applied since they were computed (``token_map.features``), so token counts and
token identities match ``x_N``. Tokens added later (CLCA's re-injected cache, carriers) have no earlier
adapter output: their rows are zero.

Only one bias is learned per adapter (on ``down_1``): the three projections are summed, so more biases
would be redundant.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from effvision.peft.token_rows import align_rows
from effvision.tokens.state import TokenState
from effvision.tokens.token_map import PerImageChoice, TokenMap

OUTPUTS_KEY = "dense_adapter_outputs"  # (prefix count, last three outputs, newest first)
DENSE_OFFSETS = (1, 3)  # inputs from the adapters 1 and 3 blocks earlier


class DenseAdapter(nn.Module):
    """One Dense Adapter: ``dim`` -> ``bottleneck`` -> ``dim``, with ``num_inputs`` (1..3) down-projections.

    ``forward(inputs)`` takes a list of (B, N, dim) tensors (x_N first, then earlier outputs in the order
    of :data:`DENSE_OFFSETS`) and returns (B, N, dim). Exactly zero at initialisation.
    """

    def __init__(self, dim: int, bottleneck: int = 64, num_inputs: int = 3) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        if not 1 <= num_inputs <= 3:
            raise ValueError(f"a dense adapter takes 1 to 3 inputs, got {num_inputs}")
        self.down_1 = nn.Linear(dim, bottleneck)
        if num_inputs >= 2:
            self.down_2 = nn.Linear(dim, bottleneck, bias=False)
        if num_inputs >= 3:
            self.down_3 = nn.Linear(dim, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, dim)
        self.num_inputs = num_inputs
        nn.init.zeros_(self.down_1.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def down_projections(self) -> list[nn.Linear]:
        return [self.down_1, getattr(self, "down_2", None), getattr(self, "down_3", None)][: self.num_inputs]

    def forward(self, inputs: list[Tensor]) -> Tensor:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"this adapter takes {self.num_inputs} inputs, got {len(inputs)}")
        hidden = sum(down(t) for down, t in zip(self.down_projections(), inputs, strict=True))
        return self.up(F.relu(hidden))

    def macs_per_token(self) -> int:
        return sum(d.in_features * d.out_features for d in self.down_projections()) + (
            self.up.in_features * self.up.out_features
        )


class DenseAdapters(nn.Module):
    """The Dense Adapters of every block, as a :class:`~effvision.tokens.blocks.BlockExtension`.

    Registered on the model as ``dense_adapters`` (``dense_adapters.adapters.3.down_1.weight`` ...).
    The last three adapter outputs live in ``state.extras`` for the current forward only.
    """

    #: ``adapters.<i>`` belongs to block i (timm's group_matcher / layer-wise lr decay, see effvision.tokens.model)
    per_block_modules = "adapters"

    def __init__(self, dim: int, depth: int, bottleneck: int = 64) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(
            DenseAdapter(dim, bottleneck, 1 + sum(index >= offset for offset in DENSE_OFFSETS))
            for index in range(depth)
        )
        self.bottleneck = bottleneck

    def injected_tokens(self, block: int) -> int:
        return 0

    @staticmethod
    def _outputs(state: TokenState) -> tuple[Tensor, ...]:
        """Earlier outputs, with zero rows for tokens added since they were computed."""
        prefix, outputs = state.extras.get(OUTPUTS_KEY, (state.num_prefix, ()))
        return tuple(align_rows(t, prefix, state.num_tokens, state.num_prefix) for t in outputs)

    @staticmethod
    def _with_outputs(state: TokenState, outputs: tuple[Tensor, ...]) -> TokenState:
        return state.replace(extras={**state.extras, OUTPUTS_KEY: (state.num_prefix, outputs)})

    def before_block(self, block: int, state: TokenState) -> TokenState:
        return self._with_outputs(state, self._outputs(state))

    def after_reduction(
        self, block: int, state: TokenState, token_map: TokenMap | PerImageChoice | None
    ) -> TokenState:
        _, outputs = state.extras.get(OUTPUTS_KEY, (state.num_prefix, ()))
        if token_map is None or not outputs:
            return state
        return self._with_outputs(state, tuple(token_map.features(t) for t in outputs))

    def parallel_ffn(self, block: int, state: TokenState) -> tuple[TokenState, Tensor]:
        # outputs[k] is the adapter output of block (block - 1 - k), already following every token map
        outputs = self._outputs(state)
        inputs = [state.x] + [outputs[offset - 1] for offset in DENSE_OFFSETS if block >= offset]
        branch = self.adapters[block](inputs)
        return self._with_outputs(state, (branch, *outputs)[: max(DENSE_OFFSETS)]), branch

    def after_block(self, block: int, state: TokenState) -> TokenState:
        return state

    def output(self, state: TokenState) -> None:
        return None

    def prune_blocks(self, depth: int):
        """After ``prune_intermediate_layers`` keeps the first ``depth`` blocks: drop the adapters of the others
        (never called again, so their parameters would get no gradient). Returns this extension."""
        self.adapters = self.adapters[:depth]
        return self

    def macs(self, schedule: list[tuple[int, int]]) -> int:
        """Adapter MACs per image: each adapter runs at its block's MLP token count."""
        return sum(
            tokens * adapter.macs_per_token() for adapter, (_, tokens) in zip(self.adapters, schedule, strict=True)
        )
