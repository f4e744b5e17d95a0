"""ONNX export of effvision models and onnxruntime validation."""
