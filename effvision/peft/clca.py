"""CLCA: Cross-Layer Cache Aggregation (Rios et al., ICASSP 2025) for token-reduced ViTs.

Two parts, usable independently and with any policy of :mod:`effvision.tokens` (and Sparse-Tuning),
computed as the authors' released code does (docs/methods.md):

* :class:`CrossLayerAggregationHead`: the CLS token after each reduction block and after the last
  block, stacked as (B, D, L) -> BatchNorm1d(D) -> depthwise Conv1d(D -> 2D, kernel L, groups D) ->
  BatchNorm1d(2D) -> GELU -> pointwise Conv1d(2D -> classes). The model's final norm becomes identity.
* :class:`CrossLayerCache`: after every whole block the plain mean of its tokens (and the last tokens of
  the sequence, with carrier tokens) is cached; after each reduction block, and by default after the
  second-to-last block too ("recover at last"), the cached tokens are appended to the sequence, as
  ordinary tokens, and the cache is cleared. Counts are static, so the token schedule,
  :func:`effvision.reduction_info` and the MAC count include them.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from effvision.peft.placement import placed_like
from effvision.peft.token_rows import append_tokens
from effvision.tokens.state import TokenState
from effvision.tokens.token_map import PerImageChoice, TokenMap

CACHE_KEY = "clca_cache"
POOL_END_KEY = "clca_pool_end"  # the release's curr_num_pool: the cached average spans positions prefix..this
CLS_KEY = "clca_cls"
INIT_STD = 0.02


class BatchTooSmallError(ValueError, RuntimeError):
    """A training batch too small for batch normalisation. A ``ValueError`` as PyTorch's own, and a
    ``RuntimeError`` too, which timm's benchmark.py records per model (and retries) instead of stopping on."""


def batch_norm_1d(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm`` on (B, C, L) ``x``. A 2-D batch norm in its place (timm's ``--split-bn`` turns every batch norm
    into a ``SplitBatchNorm2d``) gets (B, C, L, 1): the same statistics, over the batch and L."""
    if isinstance(norm, nn.BatchNorm2d):
        return norm(x.unsqueeze(-1)).squeeze(-1)
    return norm(x)


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

    #: the model's ``forward_head`` hands this head the unpooled (B, L, D) tokens (see effvision.tokens.model)
    pools_tokens = True

    def forward(self, cls_tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, L, D) CLS tokens -> (B, num_classes) logits, or the (B, 2D) features before the classifier
        with ``pre_logits`` (timm's ``forward_head(x, pre_logits=True)``)."""
        traced = isinstance(cls_tokens, torch.fx.Proxy)  # torch.fx symbolic tracing: no shapes to check
        if not traced and (cls_tokens.dim() != 3 or cls_tokens.shape[1] != self.num_layers):
            raise ValueError(
                f"the aggregation head takes (B, {self.num_layers}, D) CLS tokens, got {tuple(cls_tokens.shape)}"
            )
        if not traced and self.training and cls_tokens.shape[0] == 1:  # BatchNorm's own error names no cause
            raise BatchTooSmallError(
                "CLCA's aggregation head normalises over the batch (BatchNorm1d, as the released code): training "
                "needs 2 or more images a batch; one image works in eval mode"
            )
        x = batch_norm_1d(self.norm_in, cls_tokens.transpose(1, 2))  # (B, D, L)
        x = self.act(batch_norm_1d(self.norm_mid, self.depthwise(x)))  # (B, 2D, 1)
        return x.flatten(1) if pre_logits else self.pointwise(x).flatten(1)

    def reset_classifier(self, num_classes: int) -> None:
        """A new (untrained) classifier for ``num_classes`` (0: none, the head returns its (B, 2D) features),
        on the device and dtype of the aggregation weights, which stay as they are."""
        weight = self.depthwise.weight
        self.num_classes = num_classes
        self.pointwise = (
            nn.Conv1d(weight.shape[0], num_classes, kernel_size=1, device=weight.device, dtype=weight.dtype)
            if num_classes > 0 else nn.Identity()
        )
        self.pointwise.train(self.training)

    def macs(self) -> int:
        out = self.depthwise.out_channels
        return out * self.num_layers + (out * self.num_classes if self.num_classes > 0 else 0)


class ClsCollector:
    """Block extension (parameter-free): keeps the CLS token after the blocks in ``layers`` and makes
    the blocks return them stacked, (B, L, D), as the aggregation head's input."""

    #: its output is the input of the model's aggregation head (see ``TokenReducedModel.prune_intermediate_layers``)
    feeds_head = True

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = tuple(layers)

    def prune_blocks(self, depth: int) -> ClsCollector | None:
        """Kept while every collected block is among the first ``depth``; else None (the head cannot run)."""
        return self if max(self.layers) < depth else None

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

    def output(self, state: TokenState) -> Tensor | None:
        """(B, L, D): the collected CLS tokens; ``None`` when the blocks stopped before the last collected layer
        (``forward_intermediates(stop_early=True)``): there is no head input then, and the blocks return the
        last block's tokens, as timm's ViT does."""
        collected = state.extras.get(CLS_KEY, ())
        if len(collected) < len(self.layers):
            return None
        return torch.cat(collected, dim=1)


class CrossLayerCache(nn.Module):
    """Block extension: CLCA's cross-layer cache as the released code computes it (its ``forward`` loop).

    Registered on the model as ``clca_cache``. The released loop, after block ``i`` (here: as block
    ``i + 1``'s ``before_block``, so it sees block ``i``'s final output, after Sparse-Tuning's stage sums):

    1. if ``i`` is a cache layer: note the sequence length ``L``, append the cached tokens at the end of the
       sequence (size 1, no source patch) and clear the cache;
    2. if ``i`` comes before the last cache layer: cache the plain mean of the tokens at positions
       ``prefix .. L`` (the release slices ``x[:, 1:curr_num_pool]``: tokens appended since the last
       injection are left out until a reduction reorders them) and, with carriers, the last ``K`` tokens
       of the sequence (``x[:, -K:]``).

    So after a cache layer the averages of the blocks since the previous one join the sequence (blocks
    0-2 after block 3, 3-5 after 6, 6-8 after 9, 9 after 10): ordinary tokens, which later reductions
    prune, merge or fuse like patches and which count in their keep rates. ``L`` starts as the length
    before the carriers are appended.

    Carrier tokens: ``carriers`` learnable tokens (``carrier_tokens``, (1, K, D), started from the class
    token as the release's ``add_clr(init_cls=True)`` does) appended after the patches at the input of
    block 0, each with its own position embedding (``carrier_pos_embed``, N(0, 0.02)); models that embed
    no position for their prefix (``no_embed_class``, DeiT-3) give carriers none, as the release does.
    """

    #: parameters that enter at the input like ``pos_embed``: no weight decay, the stem's layer-wise lr
    input_parameters = ("carrier_tokens", "carrier_pos_embed")

    def __init__(
        self, dim: int, layers: tuple[int, ...], depth: int, carriers: int = 0, average: bool = True,
        carrier_position: bool = True,
    ):
        super().__init__()
        self.layers = tuple(sorted({int(layer) for layer in layers}))
        if not self.layers or not all(0 <= layer < depth - 1 for layer in self.layers):
            raise ValueError(
                f"cache layers {layers} must be blocks in 0..{depth - 2} (tokens re-injected after the last "
                "block would reach no block)"
            )
        if carriers < 0:
            raise ValueError(f"carriers must be >= 0, got {carriers}")
        if not average and not carriers:
            raise ValueError("a cache with neither the average token nor carriers caches nothing")
        self.carriers = carriers
        self.average = average
        #: the model's ``norm_pre`` (one-tuple, so it is not registered twice), applied to the carriers
        self.input_norm: tuple[nn.Module, ...] = ()
        self.carrier_tokens = self.carrier_pos_embed = None
        if carriers:
            self.carrier_tokens = nn.Parameter(torch.randn(1, carriers, dim) * INIT_STD)
            if carrier_position:
                self.carrier_pos_embed = nn.Parameter(torch.randn(1, carriers, dim) * INIT_STD)

    def tokens_per_block(self) -> int:
        return int(self.average) + self.carriers

    def cached_count(self, layer: int) -> int:
        """Tokens appended after block ``layer`` (in ``layers``): those of the blocks from the previous
        cache layer (included) or block 0, up to ``layer`` (excluded)."""
        earlier = [previous for previous in self.layers if previous < layer]
        return (layer - (earlier[-1] if earlier else 0)) * self.tokens_per_block()

    def tokens_before_block(self, block: int) -> tuple[int, int]:
        stream = self.carriers if block == 0 else 0
        if block - 1 in self.layers:
            stream += self.cached_count(block - 1)
        return stream, 0

    def injected_tokens(self, block: int) -> int:
        return 0

    def _start(self, state: TokenState) -> TokenState:
        extras = {**state.extras, CACHE_KEY: (), POOL_END_KEY: state.num_tokens}
        if self.carriers:
            carriers = self.carrier_tokens
            if self.carrier_pos_embed is not None:
                carriers = carriers + self.carrier_pos_embed
            for norm in self.input_norm:  # the release appends them before the model's norm_pre (CLIP's)
                carriers = norm(carriers)
            state = append_tokens(state, carriers.expand(state.x.shape[0], -1, -1))
        return state.replace(extras=extras)

    def before_block(self, block: int, state: TokenState) -> TokenState:
        if block == 0:
            return self._start(state)
        previous = block - 1
        cached, pool_end = list(state.extras[CACHE_KEY]), state.extras[POOL_END_KEY]
        if previous in self.layers:
            pool_end = state.num_tokens
            if cached:  # empty after block 0 (the release's torch.cat would fail there)
                state = append_tokens(state, torch.cat(cached, dim=1))
            cached = []
        if previous < self.layers[-1]:
            x = state.x
            if self.average:
                cached.append(x[:, state.num_prefix : pool_end].mean(dim=1, keepdim=True))
            if self.carriers:
                cached.append(x[:, -self.carriers :])
        return state.replace(extras={**state.extras, CACHE_KEY: tuple(cached), POOL_END_KEY: pool_end})

    def after_reduction(self, block: int, state: TokenState, token_map: TokenMap | PerImageChoice | None):
        return state

    def parallel_ffn(self, block: int, state: TokenState) -> tuple[TokenState, None]:
        return state, None

    def after_block(self, block: int, state: TokenState) -> TokenState:
        return state

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
    average: bool = True,
    recover_last: bool = True,
) -> nn.Module:
    """Add CLCA's aggregation head and/or cross-layer cache to a token-reduced timm ViT, in place.

    Args:
        model: a model prepared with :func:`effvision.reduce` (any policy; Sparse-Tuning too).
        head: replace ``model.head`` by :class:`CrossLayerAggregationHead` over the CLS tokens after
            each reduction block and the last block; ``model.norm`` (and ``fc_norm``) become identity
            and the blocks return the stacked CLS tokens (B, L, D).
        cache: add :class:`CrossLayerCache` as ``model.clca_cache``.
        carriers: carrier tokens added at the input (cache only).
        cache_layers: blocks after which the cache is re-injected; default: the reduction blocks, plus
            the second-to-last block with ``recover_last`` (the release's defaults).
        average: cache the average token (the release's default; ``False`` with carriers: carriers only).
        recover_last: with the default ``cache_layers``, also re-inject after the second-to-last block.
    """
    from effvision.bounded_config import check_switches
    from effvision.tokens.blocks import TokenReducingBlocks

    check_switches({"head": head, "cache": cache, "average": average, "recover_last": recover_last})
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
    depth = len(model.blocks)
    if cache_layers is not None:
        if not cache:
            raise ValueError("cache_layers need the cache")
        cache_layers = tuple(int(layer) for layer in cache_layers)
    else:
        cache_layers = tuple(layer for layer in layers if layer < depth - 1)
        if recover_last and depth >= 2:
            cache_layers = tuple(sorted({*cache_layers, depth - 2}))
    extensions = list(model.blocks.extensions)
    if cache:
        cache_module = CrossLayerCache(model.embed_dim, cache_layers, depth, carriers, average,
                                       carrier_position=not getattr(model, "no_embed_class", False))
        model.clca_cache = placed_like(cache_module, model)
        if isinstance(getattr(model, "norm_pre", None), nn.Module) and not isinstance(model.norm_pre, nn.Identity):
            cache_module.input_norm = (model.norm_pre,)
        cls_token = getattr(model, "cls_token", None)
        if carriers and cls_token is not None:  # the release's add_clr(init_cls=True)
            with torch.no_grad():
                cache_module.carrier_tokens.copy_(cls_token.expand_as(cache_module.carrier_tokens))
        # first: its before_block adds tokens that the other extensions' per-token tensors must then align to
        extensions.insert(0, model.clca_cache)
    if head:
        if getattr(model, "cls_token", None) is None or getattr(model, "head_dist", None) is not None:
            raise ValueError("the CLCA head needs a model with one class token (no distillation token)")
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError("the CLCA head replaces token pooling; this model pools by attention")
        head_layers = tuple(sorted({*layers, depth - 1}))
        model.head = placed_like(CrossLayerAggregationHead(model.embed_dim, len(head_layers), model.num_classes), model)
        model.head_hidden_size = 2 * model.embed_dim  # what forward_head(x, pre_logits=True) returns
        model.norm = nn.Identity()
        model.fc_norm = nn.Identity()
        model.global_pool = ""  # the head receives the stacked CLS tokens unpooled
        if isinstance(getattr(model, "pretrained_cfg", None), dict):
            # timm re-heads a checkpoint of this model (num_classes changed) by dropping its classifier's keys
            model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "classifier": "head.pointwise"}
        extensions.append(ClsCollector(head_layers))
    model.blocks.extensions = tuple(extensions)
    return model
