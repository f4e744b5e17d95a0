"""Modules added to an existing model go where the model is: its device, dtype and train/eval mode.

timm's contract: ``create_model(..., device="meta" or "cuda", dtype=...)`` places every parameter, and a model
built on a GPU gets its new parts on that GPU (a CPU adapter in a CUDA model fails at the first forward).
"""

from __future__ import annotations

from torch import nn


def placed_like(module: nn.Module, model: nn.Module) -> nn.Module:
    """``module`` moved to the device and floating dtype of ``model``'s patch embedding, in its train/eval mode."""
    weight = model.patch_embed.proj.weight
    return module.to(device=weight.device, dtype=weight.dtype).train(model.training)
