"""timm registry entries ``<method>_<timm name>`` for token-reduced ViTs.

:func:`register_reduced_models` (called by :func:`effvision.timm_models.register`, the one entry point)
makes ``timm.create_model("ppt_deit_small_patch16_224", pretrained=True)`` work. Entry points carry
their method and base model explicitly (nothing parses a registered name back apart) and accept timm's
usual kwargs (``pretrained``, ``num_classes``, ``pretrained_cfg_overlay``, ``img_size``,
``features_only``, ``out_indices``...) plus the method's options (``r``, ``layers``, ``threshold``,
``keep_rate``...), build the base timm model (which loads its weights) and reduce it.
:func:`create_reduced_model` does the same for any timm ViT name.

timm is imported inside the functions, not at module level, so registering from timm's own import
(``effvision.timm_models.register`` runs when timm is first imported) never re-enters this module.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial

from torch import nn

from effvision.tokens.policies import POLICIES
from effvision.tokens.reduce import reduce

REDUCTION_METHODS = ("ppt", "tome", "topk")
METHOD_OPTIONS = (*dict.fromkeys(option for method in REDUCTION_METHODS for option in POLICIES[method].options),
                  "track_source")
FEATURE_OPTIONS = ("features_only", "out_indices", "feature_cls")

# timm VisionTransformer bases (Sparse-Tuning and CLCA are registered for these too, see effvision.peft)
VIT_BASE_MODELS = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit3_small_patch16_224",
    "deit3_base_patch16_224",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_base_patch16_clip_224",
)
# DINOv2 (timm VisionTransformer with LayerScale; reg4: 4 register tokens), default 518 px (37x37 patches)
DINOV2_BASE_MODELS = (
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
)
# timm Eva class with rotary position embeddings: EVA-02 and the RoPE ViTs (axial and "mixed" RoPE)
ROPE_BASE_MODELS = (
    "eva02_tiny_patch14_224",
    "eva02_small_patch14_224",
    "eva02_base_patch14_224",
    "eva02_large_patch14_224",
    "vit_small_patch16_rope_224",
    "vit_base_patch16_rope_224",
    "vit_large_patch16_rope_224",
    "vit_small_patch16_rope_mixed_224",
    "vit_base_patch16_rope_mixed_224",
    "vit_large_patch16_rope_mixed_224",
)
BASE_MODELS = VIT_BASE_MODELS + DINOV2_BASE_MODELS + ROPE_BASE_MODELS

REGISTERED_MODELS = tuple(f"{method}_{base}" for method in REDUCTION_METHODS for base in BASE_MODELS)


def features_only_model(model: nn.Module, out_indices=3, feature_cls="getter") -> nn.Module:
    """timm's ``features_only=True`` wrapper around a reduced model: ``FeatureGetterNet``, which prunes
    the blocks after the last index and calls the model's ``forward_intermediates`` (NCHW maps on the
    patch grid, unmerged; see :mod:`effvision.tokens.model`)."""
    from timm.models._features import FeatureGetterNet

    if feature_cls not in ("getter", FeatureGetterNet):
        raise ValueError(f"token-reduced models support feature_cls='getter' (timm's ViT default), got {feature_cls!r}")
    features = FeatureGetterNet(model, out_indices=out_indices, output_fmt="NCHW")
    features.pretrained_cfg = features.default_cfg = getattr(model, "pretrained_cfg", {})
    return features


def take_options(kwargs: dict, keys: tuple[str, ...]) -> dict:
    """Remove ``keys`` from a builder's ``kwargs`` (those present) and return them: the options that are not
    timm's, before the rest go to ``timm.create_model``."""
    return {key: kwargs.pop(key) for key in keys if key in kwargs}


def features_or_model(model: nn.Module, features: dict) -> nn.Module:
    """``model`` as timm's ``features_only=True`` asks (``features``: the :data:`FEATURE_OPTIONS` taken out of a
    builder's kwargs): :func:`features_only_model` of it, or the model itself."""
    if features.pop("features_only", False):
        return features_only_model(model, **features)
    return model


def create_reduced_model(method: str, base_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(base_name, pretrained, **kwargs)`` reduced with ``method``.

    Method options (``r``, ``layers``, ``threshold``, ``keep_rate``, ``proportional_attention``,
    ``track_source``) are taken out of ``kwargs``; ``features_only=True`` (with ``out_indices``) wraps the
    reduced model as timm does; everything else goes to timm.
    """
    import timm

    if method not in REDUCTION_METHODS:
        raise ValueError(f"unknown token-reduction method {method!r}; choose one of {', '.join(REDUCTION_METHODS)}")
    if not timm.is_model(base_name):
        raise ValueError(f"unknown timm model {base_name!r}")
    options = take_options(kwargs, METHOD_OPTIONS)
    features = take_options(kwargs, FEATURE_OPTIONS)
    return features_or_model(reduce(timm.create_model(base_name, pretrained=pretrained, **kwargs), method, **options),
                             features)


def with_registered_cfg(name: str, kwargs: dict) -> dict:
    """``kwargs`` of the entry point ``name`` with ``pretrained_cfg`` resolved under the registered name: none
    or a tag (``"ppt_vit_base_patch16_224.augreg_in21k"`` gives ``"augreg_in21k"``) becomes the registered cfg
    (the base's weights and preprocessing, see :func:`base_pretrained_cfgs`). The model's ``pretrained_cfg``
    then names the registered architecture, as timm's own models do, so that ``push_to_hf_hub`` writes a
    config that rebuilds this model, not its base. A cfg given as a dict or ``PretrainedCfg`` (timm's
    ``hf-hub:`` / ``local-dir:`` configs) is kept, named ``name`` when it names no architecture."""
    cfg = kwargs.get("pretrained_cfg")
    if cfg is None or isinstance(cfg, str):
        from timm.models import get_pretrained_cfg

        kwargs["pretrained_cfg"] = get_pretrained_cfg(f"{name}.{cfg}" if cfg else name)
    elif isinstance(cfg, dict) and not cfg.get("architecture"):
        kwargs["pretrained_cfg"] = {**cfg, "architecture": name}
    elif not isinstance(cfg, dict) and not cfg.architecture:
        kwargs["pretrained_cfg"] = dataclasses.replace(cfg, architecture=name)
    return kwargs


def _weight_source(cfg) -> tuple:
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return tuple(cfg.get(key) for key in ("hf_hub_id", "hf_hub_filename", "url", "file", "state_dict"))


def holds_whole_model(name: str, cfg) -> bool:
    """Whether the weights ``cfg`` points at are a checkpoint of the registered model ``name`` itself rather
    than one of its base's: every source other than the base's registered ones, as timm's ``hf-hub:`` and
    ``local-dir:`` names give (a model saved with ``push_to_hf_hub`` / ``save_for_hf``). A file of one's own
    given as ``pretrained_cfg_overlay=dict(file=...)`` is decided by its keys (:func:`holds_extension_weights`)."""
    from timm.models import get_arch_pretrained_cfgs

    return _weight_source(cfg) not in [_weight_source(known) for known in get_arch_pretrained_cfgs(name).values()]


def create_registered(name: str, build, pretrained: bool, kwargs: dict) -> nn.Module:
    """The body of every registered entry point: ``build(pretrained=..., **kwargs)`` (a builder that makes the
    base timm model, loading its weights, then reduces or extends it), with ``pretrained_cfg`` resolved under
    ``name`` (:func:`with_registered_cfg`). A checkpoint of the whole model (:func:`holds_whole_model`) holds
    weights the base does not have (adapters, the CLCA head), so the model is built without weights and the
    checkpoint is loaded into all of it, strictly, by timm's ``load_pretrained``."""
    kwargs = with_registered_cfg(name, kwargs)
    whole = pretrained and holds_whole_model(name, kwargs["pretrained_cfg"])
    own_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") if pretrained and not whole else None
    if not (whole or own_file):
        return build(pretrained=pretrained, **kwargs)
    from timm.models import load_pretrained, load_state_dict

    features = take_options(kwargs, FEATURE_OPTIONS)
    model = build(pretrained=False, **kwargs)
    cfg = model.pretrained_cfg
    if own_file:  # timm's train.py --pretrained-path: base weights, or a checkpoint of this very model
        from effvision.torch_checkpoint import check_weights_file

        check_weights_file(own_file)  # a crafted file: no code, bounded pickle, tensors backed by their bytes
        state = load_state_dict(own_file)  # timm's loader, as the base's builder would call it
        if not holds_extension_weights(model, state):
            del model, state
            return features_or_model(build(pretrained=True, **kwargs), features)
        cfg = {**cfg, "state_dict": state}
    load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=kwargs.get("in_chans", 3),
                    filter_fn=base_checkpoint_filter(model))
    return features_or_model(model, features)


def holds_extension_weights(model: nn.Module, state: dict) -> bool:
    """Whether ``state`` holds weights of the modules an extension added to ``model`` (Sparse-Tuning's adapters,
    CLCA's cache and head: the children whose class is defined in :mod:`effvision.peft`), so that it is a
    checkpoint of the whole model, not of its base. Before, such a file given as
    ``pretrained_cfg_overlay=dict(file=...)`` (timm's train.py ``--pretrained-path``) went to the base and failed."""
    prefixes = tuple(
        f"{child}." for child, module in model.named_children() if type(module).__module__.startswith("effvision.peft")
    )
    if not prefixes:
        return False
    own = set(model.state_dict())
    return any(key.startswith(prefixes) and key in own for key in state)


def base_checkpoint_filter(model: nn.Module):
    """timm's checkpoint filter for the model's base class, as its builder passes it to ``load_pretrained``:
    position embeddings (and patch embeddings) resampled to the model's grid, other layouts converted. Without
    it, a checkpoint loaded into a model made at another ``img_size`` (timm's train.py ``--pretrained-path``
    with ``--img-size 64``) failed on ``pos_embed``'s shape."""
    from functools import partial

    from timm.models import eva, vision_transformer

    if isinstance(model, eva.Eva):
        return eva.checkpoint_filter_fn
    return partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True)  # as timm's DeiT builder


def _make_entrypoint(method: str, base_name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_registered(name, partial(create_reduced_model, method, base_name), pretrained, kwargs)

    name = f"{method}_{base_name}"
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{base_name} with {method} token reduction (paper defaults; override via kwargs)."
    return entrypoint


def base_pretrained_cfgs(name: str, base_name: str) -> dict:
    """The pretrained cfgs of timm's ``base_name`` (every tag, the same default first) keyed for ``name``:
    ``{"<name>.<tag>": cfg}``, as :func:`timm.models.generate_default_cfgs` takes them.

    Registered with an entry point, they make timm resolve ``name`` (and ``name.<tag>``) to the base's
    weights and preprocessing. timm's train.py / validate.py resolve the cfg of the name they are given
    (``resolve_model_input_args``) and pass it to the entry point as ``pretrained_cfg``, which goes on to
    the base model: without these entries that was a weightless default, and ``pretrained=True`` failed."""
    from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

    cfgs = {}
    for position, (key, cfg) in enumerate(get_arch_pretrained_cfgs(base_name).items()):
        tag = split_model_name_tag(key)[1]
        default_mark = "*" if position == 0 else ""  # the base's default tag stays the default
        cfgs[f"{name}.{tag}{default_mark}" if tag or default_mark else name] = cfg
    return cfgs


def register_entrypoint(entrypoint, base_name: str) -> None:
    """``timm.models.register_model(entrypoint)`` with the base model's pretrained cfgs under the entry's name
    (see :func:`base_pretrained_cfgs`), put where timm's ``register_model`` reads them: the ``default_cfgs``
    of the entry point's module."""
    from timm.models import generate_default_cfgs, register_model

    module = sys.modules[entrypoint.__module__]
    if not hasattr(module, "default_cfgs"):
        module.default_cfgs = {}
    module.default_cfgs.update(generate_default_cfgs(base_pretrained_cfgs(entrypoint.__name__, base_name)))
    setattr(module, entrypoint.__name__, entrypoint)
    register_model(entrypoint)


def register_reduced_models() -> list[str]:
    """Register ``<method>_<base>`` for every method and base model (idempotent); returns the names."""
    module = sys.modules[__name__]
    for method in REDUCTION_METHODS:
        for base_name in BASE_MODELS:
            if not hasattr(module, f"{method}_{base_name}"):
                register_entrypoint(_make_entrypoint(method, base_name), base_name)
    return list(REGISTERED_MODELS)
