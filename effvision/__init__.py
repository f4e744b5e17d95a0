"""effvision: efficient vision.

Importing this package registers the token-reduced timm models (``ppt_*``, ``tome_*``, ``topk_*``)
and exposes :func:`reduce`, :func:`reduction_info` and :func:`create_reduced_model`. It stays light:
no onnxruntime, mamba-ssm, onnx or codec code is imported here.
"""

from effvision.tokens import reduce, reduction_info
from effvision.tokens.registry import REGISTERED_MODELS, create_reduced_model

__version__ = "0.1.0"

__all__ = ["REGISTERED_MODELS", "create_reduced_model", "reduce", "reduction_info"]
