"""Run an exported ONNX model with onnxruntime behind a tensor-in, tensor-out call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class OrtModel:
    """An ONNX file as a callable: ``OrtModel("deit.onnx")(images) -> logits``.

    Args:
        path: the ``.onnx`` file (one input, first output returned).
        providers: onnxruntime execution providers, in preference order.
        threads: intra-op threads (``None``: onnxruntime's default, all cores).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        import onnxruntime

        if not Path(path).is_file():  # onnxruntime says "Protobuf parsing failed" of a folder
            raise FileNotFoundError(f"{path}: no such ONNX file (or not a regular file)")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, ...) float32 input -> the model's first output as a CPU tensor."""
        if isinstance(images, torch.Tensor):
            images = images.detach().to("cpu", torch.float32).numpy()
        output = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]
        return torch.from_numpy(output)
