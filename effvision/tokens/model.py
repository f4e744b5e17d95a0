"""timm's model contract on token-reduced ViTs.

:func:`effvision.reduce` gives the model the class ``TokenReduced<timm class>``, a subclass of its own
timm class (``VisionTransformer``, ``VisionTransformerDistilled``, ``Eva``) with :class:`TokenReducedModel`
first in the MRO. It overrides only what timm's own code cannot do on reduced tokens:

* ``forward_features`` runs the reduced blocks (Eva: with RoPE following the tokens) and never timm's
  per-block ``checkpoint_seq``, which would bypass the reduction; it calls ``model.blocks`` as a module, which
  :func:`register_fx_leaf` registers with timm as a torch.fx leaf (one opaque node in a traced graph);
* ``forward_intermediates`` (and with it ``features_only=True``) runs the reduced model. ``NLC`` returns
  the reduced tokens; ``NCHW`` scatters them back onto the patch grid through the source map
  ("unmerge": every patch takes the value of the token holding it; pruned patches are zero);
* ``set_grad_checkpointing`` checkpoints the attention and MLP of each block inside the reduction;
* ``forward_head`` / ``reset_classifier`` give a head that pools the tokens itself (``head.pools_tokens``:
  CLCA's aggregation head) the unpooled tokens, its pre-logits, and a new classifier that keeps its pooling;
* ``torch.jit.script(model)`` compiles the forward traced in eval and in training mode
  (:mod:`effvision.tokens.torchscript`);
* ``prune_intermediate_layers`` prunes the blocks' extensions with the blocks (and such a head with
  ``prune_head``).

Everything else (``pretrained_cfg``, state-dict names, ...) is timm's. The class
is a plain class attribute, not a closure over the instance, so models pickle (``torch.save(model)``) and
``copy.deepcopy`` gives an independent model.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from effvision.tokens.state import TokenState

_REDUCED_CLASSES: dict[type, type] = {}


def reduced_class(base: type) -> type:
    """``TokenReduced<base.__name__>``: ``base`` with :class:`TokenReducedModel` first (made once per class)."""
    if issubclass(base, TokenReducedModel):
        return base
    if base not in _REDUCED_CLASSES:
        _REDUCED_CLASSES[base] = type(
            f"TokenReduced{base.__name__}",
            (TokenReducedModel, base),
            {"__module__": __name__, "__doc__": f"timm ``{base.__name__}`` with token reduction."},
        )
    return _REDUCED_CLASSES[base]


def register_fx_leaf() -> None:
    """Register the reduction blocks with timm as a torch.fx leaf (one opaque node in a traced graph).

    Called when a model is reduced or unpickled, not at import: importing timm runs effvision's registry,
    which imports this package."""
    from timm.layers import register_notrace_module

    from effvision.tokens.blocks import TokenReducingBlocks

    register_notrace_module(TokenReducingBlocks)


def _new_reduced_model(base: type) -> nn.Module:
    """Unpickling: an empty instance of ``reduced_class(base)`` (the state is set by ``__setstate__``)."""
    register_fx_leaf()
    cls = reduced_class(base)
    return cls.__new__(cls)


def _is_eva(model: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(model, Eva)


def unmerge(tokens: Tensor, source: Tensor, grid: tuple[int, int]) -> Tensor:
    """Scatter reduced tokens back onto the patch grid.

    Args:
        tokens: (B, N, C) tokens of a reduced model (prefix tokens included).
        source: (B, N, N0) source map over the original tokens; only its patch columns, the last
            ``grid[0] * grid[1]``, are used.
        grid: (H, W) patch grid.

    Returns (B, C, H, W): at every patch the value of the token holding it (exactly; a source column has a
    single one), zero for a pruned patch (no token holds it).
    """
    batch, _, channels = tokens.shape
    patch_source = source[:, :, source.shape[2] - grid[0] * grid[1]:]
    holder = patch_source.argmax(dim=1)  # (B, H*W): the token holding each patch
    held = patch_source.amax(dim=1) > 0
    values = tokens.gather(1, holder.unsqueeze(-1).expand(-1, -1, channels))
    values = torch.where(held.unsqueeze(-1), values, torch.zeros_like(values))
    return values.reshape(batch, grid[0], grid[1], channels).permute(0, 3, 1, 2).contiguous()


def _check_plain_attention(attn_mask: Tensor | None, is_causal: bool) -> None:
    if isinstance(attn_mask, torch.fx.Proxy) or isinstance(is_causal, torch.fx.Proxy):
        return  # torch.fx symbolic tracing hands every argument over as a Proxy, defaults included
    if attn_mask is not None or is_causal:
        raise ValueError("token-reduced models take no attn_mask / is_causal: the token count changes per block")


def check_image_size(patch_embed: nn.Module, x: Tensor) -> None:
    """A clear ValueError when ``x`` is not what ``patch_embed`` of a token-reduced model takes."""
    if isinstance(x, torch.fx.Proxy):
        return  # torch.fx symbolic tracing: no shapes to check
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
    channels = getattr(getattr(patch_embed, "proj", None), "in_channels", x.shape[1])
    if getattr(patch_embed, "backbone", None) is not None:  # a hybrid (CNN stem) ViT: proj sees the CNN's features
        channels = x.shape[1]  # and the stem checks its own input
    if x.shape[1] != channels:
        raise ValueError(f"expected {channels}-channel images, got {x.shape[1]} channels")
    expected = tuple(patch_embed.img_size)
    if getattr(patch_embed, "strict_img_size", True) and not getattr(patch_embed, "dynamic_img_size", False):
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"this token-reduced model expects {expected[0]}x{expected[1]} images (its token schedule is "
                f"fixed), got {x.shape[-2]}x{x.shape[-1]}; create it with img_size=... for other sizes"
            )


class TokenReducedModel:
    """Mixin placed before a timm ViT class; see the module docstring. ``model.blocks`` is a
    :class:`~effvision.tokens.blocks.TokenReducingBlocks`."""

    def __reduce_ex__(self, protocol: int):
        # pickle / deepcopy rebuild the class from its timm base, so no module attribute has to exist
        return _new_reduced_model, (type(self).__bases__[1],), self.__getstate__()

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(model)`` compiles: the forward traced in eval and in training mode
        (:mod:`effvision.tokens.torchscript`; the reduction itself is Python)."""
        from effvision.tokens.torchscript import traced_for_torchscript

        return traced_for_torchscript(self)

    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Patch + position embedding, as timm's ``forward_features`` does before the blocks: the (B, N, C)
        tokens and, for Eva, its RoPE table (else None)."""
        check_image_size(self.patch_embed, images)
        if _is_eva(self):
            x, rope = self._pos_embed(self.patch_embed(images))
            return self.norm_pre(x), rope
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images)))), None

    def token_state(self, images: Tensor, track_source: bool | None = None) -> TokenState:
        """Patch + position embedding of ``images`` as the :class:`TokenState` entering the first block."""
        blocks = self.blocks
        x, rope = self._embed(images)
        return TokenState.start(x, blocks.num_prefix, blocks.track_source if track_source is None else track_source,
                                rope)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's, with the per-block modules of the model's extensions (``per_block_modules``: Sparse-Tuning's
        adapter i, ``dense_adapters.adapters.i``) grouped with block i, so that timm's layer-wise learning-rate
        decay (``--layer-decay``) scales them as their block rather than as the head."""
        matcher = dict(super().group_matcher(coarse))
        blocks = matcher["blocks"]
        blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
        for name, module in self.named_children():
            per_block = getattr(module, "per_block_modules", None)
            if per_block:
                blocks.insert(1, (rf"^{re.escape(name)}\.{re.escape(per_block)}\.(\d+)", None))
        matcher["blocks"] = blocks
        inputs = [rf"^{re.escape(name)}\.{re.escape(param)}$" for name, param in self._input_parameters()]
        if inputs:  # CLCA's carrier tokens enter with the patches: scaled as the stem, not as the head
            matcher["stem"] = "|".join([matcher["stem"], *inputs])
        return matcher

    def _input_parameters(self) -> list[tuple[str, str]]:
        """(child, parameter) of the extensions' parameters that enter at the input like ``pos_embed``
        (their ``input_parameters``: CLCA's carrier tokens and their position embedding)."""
        return [
            (name, param)
            for name, module in self.named_children()
            for param in getattr(module, "input_parameters", ())
            if getattr(module, param, None) is not None
        ]

    def no_weight_decay(self) -> set[str]:
        """timm's, with the extensions' input tokens (CLCA's carriers), which like ``cls_token`` and
        ``pos_embed`` get no weight decay."""
        return set(super().no_weight_decay()) | {f"{name}.{param}" for name, param in self._input_parameters()}

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:
        """timm's, then the reduction's schedule made again for the new patch count (see
        :func:`effvision.tokens.reduce.refresh_schedule`). A size the reduction's options do not fit is
        refused before anything changes."""
        from effvision.tokens.reduce import check_schedule_for_size, refresh_schedule

        check_schedule_for_size(self, img_size, patch_size)
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        refresh_schedule(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each block's attention and MLP (recomputed in backward), inside the reduction."""
        self.grad_checkpointing = enable
        self.blocks.grad_checkpointing = enable

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _check_plain_attention(attn_mask, is_causal)
        tokens, rope = self._embed(x)
        # through the blocks' __call__, as timm does: their hooks fire, and torch.fx sees one leaf module
        return self.norm(self.blocks(tokens) if rope is None else self.blocks(tokens, rope))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's ``forward_head``; a head that pools the tokens itself (``head.pools_tokens``: CLCA's
        aggregation head over the stacked CLS tokens) gets them unpooled and gives the pre-logits too."""
        if getattr(self.head, "pools_tokens", False):
            return self.head(self.head_drop(x), pre_logits=pre_logits)
        return super().forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        """timm's; for a head that pools the tokens itself, the classifier inside it (CLCA: ``head.pointwise``),
        the layer timm's ``--head-init-scale`` / ``--head-init-bias`` and re-heading act on."""
        if getattr(self.head, "pools_tokens", False):
            return self.head.pointwise
        return super().get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's ``reset_classifier``; a head that pools the tokens itself keeps its pooling and gets a new
        classifier (``num_classes=0``: none, the model then returns the pre-logits)."""
        if not getattr(self.head, "pools_tokens", False):
            super().reset_classifier(num_classes, global_pool)
            return
        if global_pool not in (None, ""):
            raise ValueError(f"this model's head aggregates the tokens itself; global_pool={global_pool!r} "
                             "cannot replace it (leave it None)")
        self.num_classes = num_classes
        self.head.reset_classifier(num_classes)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's, with the block extensions pruned too (``extension.prune_blocks(depth)``: the extension to keep,
        or None), so no parameter is left that the pruned model never uses. A head that pools the tokens itself
        (CLCA's) goes with ``prune_head``, with the extension feeding it: the model then returns its tokens as a
        pruned timm ViT does. Without ``prune_head`` it must still be fed (ValueError otherwise)."""
        from timm.models._features import feature_take_indices

        _, max_index = feature_take_indices(len(self.blocks), indices)
        depth = max_index + 1
        pruned = (e if getattr(e, "prune_blocks", None) is None else e.prune_blocks(depth)
                  for e in self.blocks.extensions)
        kept = [e for e in pruned if e is not None]
        pools_tokens = getattr(self.head, "pools_tokens", False)
        if prune_head:
            kept = [e for e in kept if not getattr(e, "feeds_head", False)]
        elif pools_tokens and not any(getattr(e, "feeds_head", False) for e in kept):
            raise ValueError(f"this model's head reads the class token after blocks that pruning to {depth} "
                             "blocks removes: prune with prune_head=True")
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.blocks.extensions = tuple(kept)
        if pools_tokens and prune_head:
            self.head = nn.Identity()
            self.head_hidden_size = self.embed_dim
        return take_indices

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        return_token_states: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` on the reduced model.

        Args as timm's VisionTransformer. ``indices``: the last n blocks (int), all (None) or these blocks.
        ``output_fmt="NLC"``: the reduced patch tokens (B, N_i - P, C) of each block (their count shrinks
        with depth); ``"NCHW"``: (B, C, H, W) on the patch grid, unmerged through the source map.
        ``return_token_states=True`` adds the :class:`TokenState` after each taken block (sizes and
        source map: which original patches each token holds): as the last element of the returned
        tuple, or under ``"token_states"`` with ``output_dict``.
        """
        from timm.models._features import feature_take_indices

        _check_plain_attention(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        nchw = output_fmt == "NCHW"
        take_indices, _ = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks
        state = self.token_state(x, track_source=blocks.track_source or nchw)
        final, states = blocks.forward_intermediate_states(state, take_indices, stop_early)

        tokens = [self.norm(s.x) if norm else s.x for s in states]
        # the model's own prefix tokens (a block extension could protect more: s.num_prefix would count them)
        prefix_tokens = [t[:, :blocks.num_prefix] for t in tokens]
        if nchw:  # the grid of this image, as timm's: with dynamic_img_size it is not the grid of img_size
            if getattr(self, "dynamic_img_size", False):
                grid = tuple(self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
            else:
                grid = tuple(self.patch_embed.grid_size)
            intermediates = [unmerge(t, s.source, grid) for t, s in zip(tokens, states, strict=True)]
        else:
            intermediates = [t[:, s.num_prefix:] for t, s in zip(tokens, states, strict=True)]

        if output_dict:
            result = {"image_intermediates": intermediates}
            if return_prefix_tokens and blocks.num_prefix:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(blocks.output(final))
            if return_token_states:
                result["token_states"] = states
            return result
        if return_prefix_tokens and blocks.num_prefix:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        extra = (states,) if return_token_states else ()
        if intermediates_only:
            return (intermediates, *extra) if extra else intermediates
        return (self.norm(blocks.output(final)), intermediates, *extra)
