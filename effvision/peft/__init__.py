"""Parameter-efficient fine-tuning of token-reduced ViTs: Sparse-Tuning's adapters and CLCA.

Imported lazily (never from ``effvision/__init__``): the timm entry points in
:mod:`effvision.peft.registry` import it when a ``sparse_tuning_*`` / ``clca_*`` model is built.
"""

from effvision.peft.clca import CrossLayerAggregationHead, CrossLayerCache, add_clca
from effvision.peft.dense_adapter import DenseAdapter, DenseAdapters
from effvision.peft.released_adapter import ReleasedAdapter, ReleasedAdapters
from effvision.peft.released_checkpoint import load_released_checkpoint
from effvision.peft.sparse_tuning import (
    add_dense_adapters,
    freeze_for_peft,
    sparse_tuning,
    trainable_parameter_report,
)

__all__ = [
    "CrossLayerAggregationHead",
    "CrossLayerCache",
    "DenseAdapter",
    "DenseAdapters",
    "ReleasedAdapter",
    "ReleasedAdapters",
    "add_clca",
    "add_dense_adapters",
    "freeze_for_peft",
    "load_released_checkpoint",
    "sparse_tuning",
    "trainable_parameter_report",
]
