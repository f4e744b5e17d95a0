"""MambaIC learned image codec (Zeng et al., CVPR 2025): model, checkpoints, training, evaluation."""

from __future__ import annotations

from effvision.codecs.mambaic.model import CONFIGS, MambaIC, MambaICConfig, bits_per_pixel, get_config

__all__ = [
    "CONFIGS", "MambaIC", "MambaICConfig", "bits_per_pixel", "get_config", "load", "qualities", "shipped_qualities",
]


def shipped_qualities() -> dict[int, str]:
    """Shipped quality -> its weights' id, ``<config>-q<N>`` (``lite`` for the lower rungs, a wider config of
    :data:`CONFIGS` for the upper ones)."""
    import re

    from effvision.codecs.adapters import shipped_weights

    found = (re.fullmatch(r"([a-z][a-z0-9]*)-q(\d+)", name) for name in shipped_weights("mambaic"))
    return dict(sorted((int(match.group(2)), match.group(0)) for match in found if match and match.group(1) in CONFIGS))


def qualities() -> list[int]:
    """The shipped qualities (1 = smallest files), each trained for its own lambda."""
    return list(shipped_qualities())


def load(quality: int | None = None, device: str = "cpu", pretrained: bool = False) -> MambaIC:
    """A ready :class:`MambaIC` (CDF tables built, eval mode), like ``compressai.zoo``'s model functions.

    ``quality``: a shipped quality (:func:`qualities`, numbered as compressai's zoo; default 4, lambda = 0.013).
    ``pretrained=True``: the official release (lambda = 0.025, fetched once through huggingface_hub; see
    docs/pretrained.md) instead of a shipped quality.
    """
    from effvision.codecs.adapters import load_mambaic

    if pretrained and quality is not None:
        raise ValueError("the official release has one quality; pass either quality or pretrained=True")
    return load_mambaic(quality=quality, device=device, pretrained=pretrained).model.eval()
