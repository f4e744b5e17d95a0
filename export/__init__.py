"""ONNX export of effvision models and onnxruntime validation.

``export_onnx(model, path, ...)`` exports any in-memory model, ``check_onnx(model, path, inputs)``
compares it with onnxruntime, ``OrtModel(path)`` runs an exported file. They load on first access,
so ``import effvision.export`` pulls in neither onnx nor onnxruntime.
"""

_LAZY = {"export_onnx": "onnx", "check_onnx": "onnx", "OrtModel": "ort"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'effvision.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"effvision.export.{_LAZY[name]}"), name)
