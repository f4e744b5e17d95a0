"""MambaIC learned image codec (Zeng et al., CVPR 2025): model, checkpoints, training, evaluation."""

from effvision.codecs.mambaic.model import CONFIGS, MambaIC, MambaICConfig, bits_per_pixel, get_config

__all__ = ["CONFIGS", "MambaIC", "MambaICConfig", "bits_per_pixel", "get_config"]
