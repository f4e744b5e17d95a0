"""Load the authors' released Sparse-Tuning and CLCA checkpoints into effvision models.

Both releases build on timm's ViT, so tensors whose names are ours (the backbone) load by name; the parts the
methods add are matched by structure, the module they belong to (the key without its last part) and its
shapes, so that other spellings of the same structure load too:

* a Linear (2-D ``weight``) whose name holds an integer ``i``: one of block ``i``'s released adapter
  layers (down1 dim->b, down2 b->m, up1 m->b, down3 b+m->b, up2 b->dim: five distinct shapes; the
  Sparse-Tuning release names them ``blocks.{i}.adaptmlp.*``);
* the Sparse-Tuning release's classifier, ``head.0`` (BatchNorm1d without affine parameters) and ``head.1``
  (Linear): folded into our Linear ``head`` (the same logits in eval mode);
* a BatchNorm (``running_mean``) or Conv1d (3-D ``weight``): the CLCA aggregation head's parts, by width;
* a (1, K, D) tensor: CLCA's carrier tokens (the release's ``clr``), or their position embedding when its
  name says ``pos`` (the release appends it to ``pos_embed``: its last K rows are split off).

Every trainable parameter of the model must be covered, every tensor of the file used, and shapes must
agree; anything else is a :class:`ValueError` that lists the offending names. Files are read with
``torch.load(weights_only=True)`` and effvision's allow list (what training scripts save beside the weights,
such as the release's ``args`` Namespace): no code in a checkpoint runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor, nn

from effvision.errors import UserError
from effvision.peft.clca import CrossLayerAggregationHead
from effvision.peft.released_adapter import ReleasedAdapters
from effvision.torch_checkpoint import tensor_state_dict

CONTAINER_KEYS = ("model", "state_dict", "module", "model_state")
#: the released CLCA keeps the linear classifier it was built with beside its aggregation head (``ifa_head``),
#: unused: with our aggregation head these are skipped (reported as ``ignored``)
UNUSED_RELEASED_HEAD = ("head.weight", "head.bias")
ADAPTER_LAYERS = ("down1", "down2", "up1", "down3", "up2")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a PyTorch checkpoint file (unwrapping ``{"model": ...}``-style containers and DDP's
    ``module.`` prefix), loaded without running code from the file: ``weights_only=True``, and effvision's
    allow list for what training scripts save beside the weights (the release's ``args`` Namespace,
    which ``weights_only`` alone refuses)."""
    from effvision.torch_checkpoint import load_torch_checkpoint

    if Path(path).exists() and not Path(path).is_file():  # torch.load would block on a FIFO
        raise ValueError(f"{path}: not a regular file")
    if not Path(path).exists():
        raise FileNotFoundError(path)
    try:
        loaded = tensor_state_dict(load_torch_checkpoint(path), str(path), CONTAINER_KEYS)
    except UserError as error:
        raise ValueError(str(error)) from None
    return {key.removeprefix("module."): value for key, value in loaded.items()}


#: the released Sparse-Tuning's classifier: ``head = Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear)``
RELEASED_HEAD_NORM_EPS = 1e-6


def _fold_head_norm(model: nn.Module, released: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A released ``head.0`` BatchNorm1d (its running statistics, and affine parameters if any) in front of a
    ``head.1`` Linear, folded into one Linear ``head`` for a model whose head is timm's Linear: the same logits
    in eval mode (the release's training normalises with each batch's statistics; ours has no such norm)."""
    keys = ("head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias")
    if not isinstance(getattr(model, "head", None), nn.Linear) or not all(key in released for key in keys):
        return released, []
    released = dict(released)
    mean, var = released.pop("head.0.running_mean").double(), released.pop("head.0.running_var").double()
    released.pop("head.0.num_batches_tracked", None)
    scale = (var + RELEASED_HEAD_NORM_EPS).rsqrt()
    shift = -mean * scale
    if "head.0.weight" in released and "head.0.bias" in released:  # an affine BatchNorm
        gamma = released.pop("head.0.weight").double()
        shift = shift * gamma + released.pop("head.0.bias").double()
        scale = scale * gamma
    weight, bias = released.pop("head.1.weight"), released.pop("head.1.bias")
    released["head.weight"] = (weight.double() * scale[None]).to(weight.dtype)
    released["head.bias"] = (bias.double() + weight.double() @ shift).to(bias.dtype)
    return released, ["head.0 (BatchNorm1d) folded into head.1 as head"]


def _targets(model: nn.Module) -> dict[tuple, str]:
    """Structural signature -> our module name, for every released part the model has."""
    targets: dict[tuple, str] = {}
    adapters = getattr(model, "dense_adapters", None)
    if adapters is not None and not isinstance(adapters, ReleasedAdapters):
        raise ValueError(
            "released Sparse-Tuning checkpoints hold the released adapters: build the model with "
            "adapter='released' (the default)"
        )
    if adapters is not None:
        for index, adapter in enumerate(adapters.adapters):
            shapes = {name: tuple(getattr(adapter, name).weight.shape) for name in ADAPTER_LAYERS}
            if len(set(shapes.values())) < len(shapes):
                raise ValueError(f"adapter layer shapes {shapes} are not distinct: cannot match them by shape")
            for name, shape in shapes.items():
                targets[("linear", index, shape)] = f"dense_adapters.adapters.{index}.{name}"
    if isinstance(model.head, CrossLayerAggregationHead):
        for name in ("norm_in", "norm_mid"):
            targets[("batch_norm", getattr(model.head, name).num_features)] = f"head.{name}"
        for name in ("depthwise", "pointwise"):
            module = getattr(model.head, name)
            if isinstance(module, nn.Conv1d):
                targets[("conv", tuple(module.weight.shape))] = f"head.{name}"
    cache = getattr(model, "clca_cache", None)
    if cache is not None and cache.carrier_tokens is not None:
        targets[("carriers", False)] = "clca_cache.carrier_tokens"
        targets[("carriers", True)] = "clca_cache.carrier_pos_embed"
    return targets


def _signature(module_name: str, tensors: dict[str, Tensor]) -> tuple | None:
    weight = tensors.get("weight")
    if "running_mean" in tensors:
        return ("batch_norm", tensors["running_mean"].shape[0])
    if weight is not None and weight.dim() == 3:
        return ("conv", tuple(weight.shape))
    if weight is not None and weight.dim() == 2:
        block = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_name)
        return ("linear", int(block.group(1)), tuple(weight.shape)) if block else None
    return None


def load_released_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load a released Sparse-Tuning / CLCA checkpoint into ``model`` (built with the same options).

    Returns ``{"by_name": [...], "by_structure": {our name: released name}, "ignored": [...], "folded": [...]}``.
    Raises
    ValueError when a trainable parameter is missing from the file, a tensor of the file has no place in the
    model, two tensors claim the same place, or shapes disagree.
    """
    released, folded = _fold_head_norm(model, _release_layout(model, read_state_dict(path)))
    aggregation_head = isinstance(model.head, CrossLayerAggregationHead)
    ignored = [key for key in UNUSED_RELEASED_HEAD if aggregation_head and key in released]
    for key in ignored:
        del released[key]
    ours = model.state_dict()
    targets = _targets(model)
    assigned: dict[str, Tensor] = {}
    mapping: dict[str, str] = {}
    problems: list[str] = []

    def assign(our_name: str, released_name: str) -> None:
        value = released[released_name]
        if our_name not in ours:
            problems.append(f"{released_name}: no parameter {our_name} in the model")
        elif tuple(ours[our_name].shape) != tuple(value.shape):
            expected = tuple(ours[our_name].shape)
            problems.append(f"{released_name}: shape {tuple(value.shape)}, model {our_name} {expected}")
        elif our_name in assigned:
            problems.append(f"{released_name}: {our_name} already loaded from {mapping.get(our_name, our_name)}")
        else:
            assigned[our_name] = value
            if our_name != released_name:
                mapping[our_name] = released_name

    modules: dict[str, dict[str, Tensor]] = {}
    for key in released:
        if key in ours:
            assign(key, key)
        else:
            prefix, _, suffix = key.rpartition(".")
            modules.setdefault(prefix, {})[suffix] = key
    for module_name, parts in modules.items():
        tensors = {suffix: released[key] for suffix, key in parts.items()}
        signature = _signature(module_name, tensors)
        if signature in targets:
            for suffix, key in parts.items():
                assign(f"{targets[signature]}.{suffix}", key)
            continue
        for key in parts.values():
            value = released[key]
            carrier = ("carriers", "pos" in key.lower())
            if value.dim() == 3 and value.shape[0] == 1 and carrier in targets:
                assign(targets[carrier], key)
            else:
                problems.append(f"{key}: shape {tuple(value.shape)} matches no part of this model")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    problems += [f"missing from the file: {name}" for name in sorted(trainable - set(assigned))]
    if problems:  # at most 100 lines, each cut: a crafted file of 200000 keys made a 51 MB message
        shown = [f"{problem:.200}" for problem in problems[:100]]
        more = [f"... ({len(problems)} problems in all)"] if len(problems) > 100 else []
        raise ValueError(f"{path} does not fit this model:\n  " + "\n  ".join(shown + more))
    model.load_state_dict(assigned, strict=False)
    return {"by_name": sorted(set(assigned) - set(mapping)), "by_structure": mapping, "ignored": ignored,
            "folded": folded}


def _release_layout(model: nn.Module, released: dict[str, Tensor]) -> dict[str, Tensor]:
    """The released CLCA stores its carriers' position embedding as the last K rows of ``pos_embed`` (its
    ``add_clr`` concatenates them): split off as ``pos_embed[N:]``, a (1, K, D) tensor matched to
    ``clca_cache.carrier_pos_embed`` (its carrier tokens, ``clr``, are matched by shape)."""
    cache = getattr(model, "clca_cache", None)
    value = released.get("pos_embed")
    ours = getattr(model, "pos_embed", None)
    if cache is None or cache.carrier_pos_embed is None or value is None or ours is None:
        return released
    rows = ours.shape[1]
    if value.dim() != 3 or value.shape[1] != rows + cache.carriers:
        return released
    return {**released, "pos_embed": value[:, :rows], f"pos_embed[{rows}:]": value[:, rows:]}
