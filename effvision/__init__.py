"""effvision: efficient vision.

Importing this package registers the token-reduced timm models (``ppt_*``, ``tome_*``, ``topk_*``...)
and exposes :func:`reduce` / :func:`reduction_info`. It stays light: no onnxruntime, mamba-ssm or codec
code is imported here.
"""

__version__ = "0.1.0"
