"""What a fine-tuning run writes: only the trained weights (safetensors) and a JSON config.

Run folder layout:

* ``config.json``: model name, model kwargs, base weights, classes, hyper-parameters (the run's identity;
  a resume with a different one is refused).
* ``trainable.safetensors``: the parameters that train (``requires_grad``) and the buffers of the
  modules holding them (e.g. BatchNorm statistics of the CLCA head), after the last finished epoch.
* ``training_state.pt``: optimizer, schedule, grad scaler, finished epochs and metrics, for resuming
  (:func:`effvision.training.save_training_state`: tensors and plain Python values only).
* ``metrics.json``: per-epoch train loss/accuracy and val top-1.

Every file is written atomically (temp file + ``os.replace``), weights and state before the metrics,
so an interrupted run never leaves a half-written epoch behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from effvision.io_utils import atomic_path, check_safetensors_file

CONFIG = "config.json"
WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"
METRICS = "metrics.json"


def save_json(path: Path, data) -> None:
    with atomic_path(path) as temp:
        Path(temp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters plus the buffers of every module that owns one (BatchNorm statistics)."""
    tensors: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not any(param.requires_grad for param in own.values()):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, param in own.items():
            if param.requires_grad:
                tensors[prefix + name] = param.detach()
        for name, buffer in module.named_buffers(recurse=False):
            tensors[prefix + name] = buffer.detach()
    return {name: t.cpu().clone().contiguous() for name, t in tensors.items()}


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as temp:
        save_file(trainable_state_dict(model), temp)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``trainable.safetensors`` into ``model``: it must hold every trainable weight of the model (what
    :func:`save_weights` writes), each with the model's shape and a floating-point dtype, finite, and nothing
    else. A crafted or damaged file (NaN weights, no weights, integers) was loaded and scored as if trained."""
    from safetensors.torch import load_file

    from effvision.bounded_config import check_finite
    from effvision.errors import UserError, names_for_message

    check_safetensors_file(path, "weights file")  # load_file blocks on a FIFO; a huge header costs GBs
    try:
        saved = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{path} is not a readable safetensors file ({error})") from error
    own = model.state_dict()
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise UserError(f"{path} does not fit this model: unknown weights {names_for_message(unknown, 5)}")
    missing = sorted(set(trainable_state_dict(model)) - set(saved))
    if missing:
        raise UserError(f"{path} does not fit this model: it lacks trained weights {names_for_message(missing, 5)}")
    bad = [name for name, t in saved.items() if t.shape != own[name].shape or t.is_floating_point()
           != own[name].is_floating_point()]
    if bad:
        raise UserError(f"{path} does not fit this model: shape or dtype mismatch for {names_for_message(bad, 5)}")
    check_finite(saved, str(path))
    model.load_state_dict(saved, strict=False)
