"""CLCA: Cross-Layer Cache Aggregation (Rios et al., ICASSP 2025) for token-reduced ViTs.

Two parts, usable independently and with any policy of :mod:`effvision.tokens` (and Sparse-Tuning):

* :class:`CrossLayerAggregationHead`: the CLS token after each reduction block and after the last
  block, stacked as (B, D, L) -> BatchNorm1d(D) -> depthwise Conv1d(D -> 2D, kernel L, groups D) ->
  BatchNorm1d(2D) -> GELU -> pointwise Conv1d(2D -> classes). The model's final norm becomes identity.
* :class:`CrossLayerCache`: after every block the global average of the patch tokens (size-weighted,
  so a merged token counts for the patches it holds) is cached; right after each reduction the cached
  tokens, plus optional learnable carrier tokens (initialised from the CLS token), are appended to the
  sequence and the cache is cleared. The number of appended tokens is static (blocks since the last
  injection + carriers), so the token schedule, :func:`effvision.reduction_info` and the MAC count
  include them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from effvision.tokens.state import TokenState
from effvision.tokens.token_map import PerImageChoice, TokenMap

CACHE_KEY = "clca_cache"
CLS_KEY = "clca_cls"


class CrossLayerAggregationHead(nn.Module):
    """Classifier over ``num_layers`` CLS tokens: (B, L, D) -> (B, num_classes), or (B, 2D) when
    ``num_classes == 0``.

    Parameters: 2D (BN) + 2D*L + 2D (depthwise) + 4D (BN) + 2D*C + C (pointwise).
    """

    def __init__(self, dim: int, num_layers: int, num_classes: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.num_classes = num_classes
        self.norm_in = nn.BatchNorm1d(dim)
        self.depthwise = nn.Conv1d(dim, 2 * dim, kernel_size=num_layers, groups=dim)
        self.norm_mid = nn.BatchNorm1d(2 * dim)
        self.act = nn.GELU()
        self.pointwise = nn.Conv1d(2 * dim, num_classes, kernel_size=1) if num_classes > 0 else nn.Identity()

    def forward(self, cls_tokens: Tensor) -> Tensor:
        if cls_tokens.dim() != 3 or cls_tokens.shape[1] != self.num_layers:
            raise ValueError(
                f"the aggregation head takes (B, {self.num_layers}, D) CLS tokens, got {tuple(cls_tokens.shape)}"
            )
        x = self.norm_in(cls_tokens.transpose(1, 2))  # (B, D, L)
        x = self.act(self.norm_mid(self.depthwise(x)))  # (B, 2D, 1)
        return self.pointwise(x).flatten(1)

    def macs(self) -> int:
        out = self.depthwise.out_channels
        return out * self.num_layers + (out * self.num_classes if self.num_classes > 0 else 0)


class ClsCollector:
    """Block extension (parameter-free): keeps the CLS token after the blocks in ``layers`` and makes
    the blocks return them stacked, (B, L, D), as the aggregation head's input."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = tuple(layers)

    def injected_tokens(self, block: int) -> int:
        return 0

    def after_reduction(self, block: int, state: TokenState, token_map: TokenMap | PerImageChoice | None):
        return state

    def parallel_ffn(self, block: int, state: TokenState) -> tuple[TokenState, None]:
        return state, None

    def after_block(self, block: int, state: TokenState) -> TokenState:
        if block not in self.layers:
            return state
        collected = (*state.extras.get(CLS_KEY, ()), state.x[:, :1])
        return state.replace(extras={**state.extras, CLS_KEY: collected})

    def output(self, state: TokenState) -> Tensor:
        return torch.cat(state.extras[CLS_KEY], dim=1)


def append_tokens(state: TokenState, tokens: Tensor) -> TokenState:
    """Append ``tokens`` (B, K, C) to the sequence; they hold no original patch (size 1, empty source row)."""
    batch, count = tokens.shape[:2]
    size = torch.cat([state.sizes(), state.sizes().new_ones(batch, count)], dim=1)
    source = state.source
    if source is not None:
        source = torch.cat([source, source.new_zeros(batch, count, source.shape[2])], dim=1)
    return state.replace(x=torch.cat([state.x, tokens.to(state.x.dtype)], dim=1), size=size, source=source)


class CrossLayerCache(nn.Module):
    """Block extension: the cross-layer cache, re-injected right after the reduction at ``layers``.

    ``carriers`` learnable tokens per injection (parameter ``carrier_tokens``, (len(layers), K, D),
    initialised from ``cls_token``) join the cached averages. Registered on the model as ``clca_cache``.
    """

    def __init__(self, dim: int, layers: tuple[int, ...], carriers: int = 0, cls_token: Tensor | None = None):
        super().__init__()
        self.layers = tuple(sorted(layers))
        if carriers < 0:
            raise ValueError(f"carriers must be >= 0, got {carriers}")
        self.carriers = carriers
        self.carrier_tokens = None
        if carriers:
            init = torch.zeros(dim) if cls_token is None else cls_token.detach().reshape(dim)
            self.carrier_tokens = nn.Parameter(init.expand(len(self.layers), carriers, dim).clone())

    def cached_count(self, block: int) -> int:
        """Block averages waiting in the cache when the reduction of ``block`` runs."""
        earlier = [layer for layer in self.layers if layer < block]
        return block - (earlier[-1] if earlier else 0)

    def injected_tokens(self, block: int) -> int:
        return self.cached_count(block) + self.carriers if block in self.layers else 0

    def after_reduction(self, block: int, state: TokenState, token_map: TokenMap | PerImageChoice | None):
        if block not in self.layers:
            return state
        tokens = list(state.extras.get(CACHE_KEY, ()))
        if self.carrier_tokens is not None:
            carriers = self.carrier_tokens[self.layers.index(block)]
            tokens.append(carriers.unsqueeze(0).expand(state.x.shape[0], -1, -1))
        extras = {**state.extras, CACHE_KEY: ()}
        if not tokens:
            return state.replace(extras=extras)
        return append_tokens(state, torch.cat(tokens, dim=1)).replace(extras=extras)

    def parallel_ffn(self, block: int, state: TokenState) -> tuple[TokenState, None]:
        return state, None

    def after_block(self, block: int, state: TokenState) -> TokenState:
        patches = state.x[:, state.num_prefix:]
        weight = state.sizes()[:, state.num_prefix:, None].to(patches.dtype)
        average = (patches * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True)
        return state.replace(extras={**state.extras, CACHE_KEY: (*state.extras.get(CACHE_KEY, ()), average)})

    def output(self, state: TokenState) -> None:
        return None


def reduction_layers(model: nn.Module) -> tuple[int, ...]:
    """Blocks where the model's policy removes tokens (from its static schedule, without CLCA)."""
    from effvision.tokens.flops import input_tokens

    blocks = model.blocks
    tokens, layers = input_tokens(model), []
    for index in range(len(blocks)):
        out = blocks.policy.output_tokens(index, tokens, blocks.num_prefix)
        if out < tokens:
            layers.append(index)
        tokens = out
    return tuple(layers)


def add_clca(
    model: nn.Module,
    head: bool = True,
    cache: bool = True,
    carriers: int = 0,
    cache_layers: tuple[int, ...] | None = None,
) -> nn.Module:
    """Add CLCA's aggregation head and/or cross-layer cache to a token-reduced timm ViT, in place.

    Args:
        model: a model prepared with :func:`effvision.reduce` (any policy; Sparse-Tuning too).
        head: replace ``model.head`` by :class:`CrossLayerAggregationHead` over the CLS tokens after
            each reduction block and the last block; ``model.norm`` (and ``fc_norm``) become identity
            and the blocks return the stacked CLS tokens (B, L, D).
        cache: add :class:`CrossLayerCache` as ``model.clca_cache``.
        carriers: learnable carrier tokens per injection (cache only).
        cache_layers: blocks after whose reduction the cache is re-injected; default: the reduction
            blocks. Other blocks are allowed (the paper also re-injects at block 10 of 12).
    """
    from effvision.tokens.blocks import TokenReducingBlocks

    if not isinstance(model.blocks, TokenReducingBlocks):
        raise ValueError("CLCA needs a token-reduced model: call effvision.reduce(model, method, ...) first")
    if not (head or cache):
        raise ValueError("CLCA with neither head nor cache does nothing: enable at least one")
    if carriers and not cache:
        raise ValueError("carrier tokens belong to the cross-layer cache: enable the cache to use them")
    if any(isinstance(ext, (CrossLayerCache, ClsCollector)) for ext in model.blocks.extensions):
        raise ValueError("this model already has CLCA")
    layers = reduction_layers(model)
    if not layers:
        raise ValueError("CLCA aggregates around reduction blocks, but this model's policy reduces no tokens")
    if cache_layers is not None:
        cache_layers = tuple(int(layer) for layer in cache_layers)
        if not cache or not cache_layers or not all(0 <= layer < len(model.blocks) for layer in cache_layers):
            raise ValueError(f"cache_layers {cache_layers} need the cache and blocks in 0..{len(model.blocks) - 1}")
    extensions = list(model.blocks.extensions)
    if cache:
        model.clca_cache = CrossLayerCache(
            model.embed_dim, cache_layers or layers, carriers, getattr(model, "cls_token", None)
        )
        extensions.append(model.clca_cache)
    if head:
        if getattr(model, "cls_token", None) is None or getattr(model, "head_dist", None) is not None:
            raise ValueError("the CLCA head needs a model with one class token (no distillation token)")
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError("the CLCA head replaces token pooling; this model pools by attention")
        head_layers = tuple(sorted({*layers, len(model.blocks) - 1}))
        model.head = CrossLayerAggregationHead(model.embed_dim, len(head_layers), model.num_classes)
        model.norm = nn.Identity()
        model.fc_norm = nn.Identity()
        model.global_pool = ""  # the head receives the stacked CLS tokens unpooled
        extensions.append(ClsCollector(head_layers))
    model.blocks.extensions = tuple(extensions)
    return model
