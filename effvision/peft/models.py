"""Builders behind the timm names ``sparse_tuning_<base>`` and ``clca_<method>_<base>``
(registered by :mod:`effvision.peft.registry`).

Keyword arguments: timm's usual ones (``pretrained``, ``num_classes``, ``pretrained_cfg_overlay``,
``img_size``...), the reduction options of :func:`effvision.reduce` (``r``, ``layers``, ``threshold``,
``keep_rate``, ``proportional_attention``, ``track_source``), and:

* Sparse-Tuning: ``bottleneck=64``, ``reduction="topk"``, ``freeze=True``, ``adapter="released"``
  (or ``"dense"``), ``inner=None`` (``bottleneck // 2``), ``stage_starts=None`` (the reduction blocks).
* CLCA: ``clca_head=True``, ``clca_cache=True``, ``carriers=0``, ``cache_layers=None`` (reduction blocks
  and, with ``recover_last=True``, the second-to-last block), ``average=True``.
"""

from __future__ import annotations

import timm
from torch import nn

from effvision.bounded_config import check_switches
from effvision.peft.clca import add_clca
from effvision.peft.registry import CLCA_METHODS
from effvision.peft.sparse_tuning import freeze_for_peft, sparse_tuning
from effvision.tokens.reduce import reduce
from effvision.tokens.registry import FEATURE_OPTIONS, METHOD_OPTIONS, features_or_model, take_options

SPARSE_TUNING_OPTIONS = ("bottleneck", "reduction", "freeze", "adapter", "inner", "stage_starts")
CLCA_OPTIONS = ("clca_head", "clca_cache", "carriers", "cache_layers", "average", "recover_last")


#: options that must be True or False ("false", a string, is true: freeze="false" froze the backbone)
BOOLEAN_OPTIONS = ("freeze", "clca_head", "clca_cache", "average", "recover_last", "track_source")


def _check_booleans(kwargs: dict) -> None:
    check_switches({name: kwargs[name] for name in BOOLEAN_OPTIONS if name in kwargs})


def _base(base_name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    if not timm.is_model(base_name):
        raise ValueError(f"unknown timm model {base_name!r}")
    return timm.create_model(base_name, pretrained=pretrained, **kwargs)


def create_sparse_tuning_model(base_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(base_name)`` as a Sparse-Tuning model (frozen, dense adapters, top-k 0.7)."""
    _check_booleans(kwargs)
    features = take_options(kwargs, FEATURE_OPTIONS)
    reduction_options = take_options(kwargs, METHOD_OPTIONS)
    options = take_options(kwargs, SPARSE_TUNING_OPTIONS)
    track_source = reduction_options.pop("track_source", False)
    model = _base(base_name, pretrained, kwargs)
    reduce(model, options.pop("reduction", "topk"), track_source=track_source, **reduction_options)
    return features_or_model(sparse_tuning(model, **options), features)


def create_clca_model(method: str, base_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(base_name)`` reduced with ``method`` (or Sparse-Tuning) plus CLCA.

    With ``method="sparse_tuning"`` the backbone stays frozen and the CLCA head and carriers train.
    """
    if method not in CLCA_METHODS:
        raise ValueError(f"unknown CLCA base method {method!r}; choose one of {', '.join(CLCA_METHODS)}")
    _check_booleans(kwargs)
    features = take_options(kwargs, FEATURE_OPTIONS)
    clca_options = take_options(kwargs, CLCA_OPTIONS)
    clca = dict(head=clca_options.pop("clca_head", True), cache=clca_options.pop("clca_cache", True),
                **clca_options)
    # timm's --gp was silently unused; "" is what the head sets (a saved model's config carries it)
    if clca["head"] and kwargs.get("global_pool") not in (None, "token", ""):
        raise ValueError(f"CLCA's aggregation head pools the class tokens of several blocks itself; "
                         f"global_pool={kwargs['global_pool']!r} cannot apply (leave it unset, or clca_head=False)")
    if method == "sparse_tuning":
        freeze = kwargs.pop("freeze", True)
        model = create_sparse_tuning_model(base_name, pretrained, freeze=False, **kwargs)
        add_clca(model, **clca)
        if freeze:
            freeze_for_peft(model)
        return features_or_model(model, features)
    options = take_options(kwargs, METHOD_OPTIONS)
    model = reduce(_base(base_name, pretrained, kwargs), method, **options)
    return features_or_model(add_clca(model, **clca), features)
