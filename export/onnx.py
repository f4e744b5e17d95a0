"""Export any in-memory model to ONNX and check it against PyTorch with onnxruntime.

``export_onnx`` works for plain timm ViTs, effvision's token-reduced ViTs (fixed token counts: the dynamo
exporter's graph has fixed shapes apart from the batch axis; the torchscript exporter's computes the token
counts from shapes at run time) and codec transforms (dynamic height/width where the architecture allows
it). ``onnx`` and ``onnxruntime`` are imported inside the functions, never at import time of
:mod:`effvision.export`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from effvision.io_utils import atomic_path

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
#: torch's dynamo exporter writes opset 18 or later: asked for less, it exported at 18, failed to convert down
#: (a 15-line traceback on stderr) and still wrote the opset-18 file
MIN_DYNAMO_OPSET = 18


def _dynamic_axes(names: Sequence[str], dynamic_batch: bool, dynamic_hw: bool, rank: int) -> dict:
    axes: dict[int, str] = {}
    if dynamic_batch:
        axes[0] = "batch"
    if dynamic_hw and rank == 4:
        axes.update({2: "height", 3: "width"})
    return {name: dict(axes) for name in names}


def _dynamic_shapes(example: torch.Tensor, dynamic_batch: bool, dynamic_hw: bool, hw_multiple: int) -> dict:
    shapes: dict[int, object] = {}
    if dynamic_batch:
        shapes[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_hw and example.dim() == 4:
        for axis, label in ((2, "height"), (3, "width")):
            if hw_multiple > 1:
                shapes[axis] = hw_multiple * torch.export.Dim(f"{label}_blocks", min=1, max=65535 // hw_multiple)
            else:
                shapes[axis] = torch.export.Dim(label, min=1, max=65535)
    return {"x": shapes}


@contextlib.contextmanager
def _native_output_dropped_on_error() -> Iterator[None]:
    """Hold what is written to file descriptors 1 and 2 meanwhile; on success it is written out, on an error it
    is dropped. The TorchScript exporter prints its whole IR graph (hundreds of lines, on stdout) before raising,
    which buried the one line saying what failed (e.g. an operator the opset lacks)."""
    streams = ((1, sys.stdout), (2, sys.stderr))
    try:
        for _, stream in streams:
            stream.flush()
        saved = [os.dup(fd) for fd, _ in streams]
    except (OSError, ValueError, AttributeError):  # no real descriptors (an embedding host): nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        held = (out, err)
        for (fd, _), file in zip(streams, held, strict=True):
            os.dup2(file.fileno(), fd)
        failed = True
        try:
            yield
            failed = False
        finally:
            for (fd, stream), file, original in zip(streams, held, saved, strict=True):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()  # Python's own buffered text of this span goes with it
                os.dup2(original, fd)
                os.close(original)
                if not failed:
                    file.seek(0)
                    text = file.read()
                    if text:
                        stream.write(text.decode(errors="replace"))


class _SingleInput(nn.Module):
    """Names the forward argument ``x`` so dynamic shapes can refer to it whatever the model calls it, and
    refuses outputs that are not one tensor (a dict or tuple exported as its first entry only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x)
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"export_onnx needs a model with one tensor out; this one returns {type(output).__name__} "
                "(wrap it in a module that returns the tensor to export)"
            )
        return output


def _float_eval_copy(model: nn.Module) -> nn.Module:
    """The model as exported and compared: a copy, in eval mode, on the CPU, with float32 weights. The
    caller's model is never touched (restoring its state afterwards reset every sub-module's train/eval flag
    to the root's, and a bfloat16 model could not take the float32 example at all)."""
    return copy.deepcopy(model).float().to("cpu").eval()


def _check_symbolic_batch(path: str, input_name: str) -> None:
    """A RuntimeError when the exported graph's input has a fixed batch size (torch.export specialises an
    axis it sees at size 1, and may specialise others, without an error)."""
    import onnx

    graph = onnx.load(path).graph
    for value in graph.input:
        if value.name == input_name:
            batch = value.type.tensor_type.shape.dim[0]
            if not batch.dim_param:
                raise RuntimeError(
                    f"the exporter fixed the batch size at {batch.dim_value}: this model does not export with "
                    "a dynamic batch (try the other exporter, or dynamic_batch=False)"
                )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_hw: bool = False,
    hw_multiple: int = 1,
    exporter: str = "torchscript",
    input_name: str = "input",
    output_name: str = "output",
    overwrite: bool = True,
) -> Path:
    """Export ``model`` (one tensor in, one tensor out) to an ONNX file, atomically.

    Args:
        model: any module with one tensor out; a copy of it is exported, in eval mode, on the CPU, with
            float32 weights (the model itself is not changed).
        path: destination ``.onnx`` file; written to a temporary file first, then renamed.
        input_shape: example input shape, e.g. ``(1, 3, 224, 224)``.
        opset: ONNX opset version.
        dynamic_batch: make axis 0 of the input and output symbolic (a RuntimeError if the exporter cannot).
        dynamic_hw: also make height/width symbolic (convolutional codec transforms).
        hw_multiple: with ``dynamic_hw`` and the dynamo exporter, height/width are multiples of this.
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``) or ``"dynamo"``
            (``torch.export`` based). Both are checked by the tests for every registered reduced model. Both
            write one self-contained file (the weights inside it, so the model must stay under protobuf's 2 GB).
        input_name / output_name: graph input/output names.
        overwrite: replace an existing file (``False`` raises ``FileExistsError``).

    Returns:
        The path written.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "dynamo" and opset < MIN_DYNAMO_OPSET:
        raise ValueError(f"the dynamo exporter writes opset {MIN_DYNAMO_OPSET} or later, not {opset}; use the "
                         "torchscript exporter for an earlier opset")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    wrapped = _SingleInput(_float_eval_copy(model))
    shape = list(input_shape)
    if exporter == "dynamo" and dynamic_batch and shape[0] == 1:
        shape[0] = 2  # torch.export specialises an axis it sees at size 1: the batch came out fixed at 1
    example = torch.randn(*shape)
    with atomic_path(path) as temp_name, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer warnings
        if exporter == "dynamo":
            options = dict(
                dynamo=True,
                verbose=False,
                # weights inside the file: by default they went to "<temporary name>.data" beside it, which
                # the move into place left behind as a hidden file the moved model still pointed to
                external_data=False,
                dynamic_shapes=_dynamic_shapes(example, dynamic_batch, dynamic_hw, hw_multiple),
            )
        else:
            options = dict(
                dynamo=False,
                do_constant_folding=True,
                dynamic_axes=_dynamic_axes([input_name, output_name], dynamic_batch, dynamic_hw, example.dim()),
            )
        with _native_output_dropped_on_error():
            torch.onnx.export(
                wrapped,
                (example,),
                temp_name,
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                **options,
            )
        if dynamic_batch and exporter == "dynamo":  # dynamic_axes makes the TorchScript one symbolic by name
            _check_symbolic_batch(temp_name, input_name)
        _check_opset(temp_name, opset)
    return path


def _check_opset(path: str, opset: int) -> None:
    """A RuntimeError unless the file's default-domain opset is the one asked for (the file is then not kept)."""
    import onnx

    written = [entry.version for entry in onnx.load(path, load_external_data=False).opset_import
               if entry.domain in ("", "ai.onnx")]
    if written != [opset]:
        raise RuntimeError(f"the exporter wrote opset {written[0] if written else 'none'}, not the {opset} asked for")


def max_abs_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference; NaN or infinity where only one side has it counts as ``inf`` (equal
    values, NaN in both, or the same infinity count as 0), so a NaN can never pass a tolerance check."""
    same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    difference = torch.where(same, torch.zeros_like(actual), (actual - expected).abs())
    return difference.nan_to_num(nan=float("inf"), posinf=float("inf")).max().item()


def check_onnx(
    model: nn.Module,
    path: str | Path,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict:
    """Run ``model`` (a float32 copy in eval mode on the CPU, as exported) and the ONNX file on the same inputs.

    Args:
        model: the module that was exported.
        path: the ONNX file.
        inputs: one batch or several (e.g. batch 1 and batch 5, random and real images).

    Returns:
        ``{"max_abs_diff": float, "top1_agreement": float | None, "batches": [...], "images": int,
        "finite": bool}``; ``top1_agreement`` (fraction of images whose argmax class matches) is ``None`` for
        outputs that are not (batch, classes) logits; ``finite``: every PyTorch output is finite (NaN in both
        outputs counts as agreement, so a NaN model would otherwise pass).
    """
    from effvision.export.ort import OrtModel

    session = OrtModel(path, providers=providers)
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    reference = _SingleInput(_float_eval_copy(model))  # as exported; the model itself is not changed
    max_diff, agree, images, logits, finite = 0.0, 0, 0, True, True
    per_batch = []
    for batch in batches:
        with torch.no_grad():
            expected = reference(batch.float().cpu()).float()
        actual = session(batch.float())
        if actual.shape != expected.shape:
            raise ValueError(f"ONNX output shape {tuple(actual.shape)} != PyTorch {tuple(expected.shape)}")
        diff = max_abs_difference(actual, expected)
        finite = finite and bool(torch.isfinite(expected).all())
        per_batch.append({"batch": batch.shape[0], "shape": list(batch.shape), "max_abs_diff": diff})
        max_diff = max(max_diff, diff)
        images += batch.shape[0]
        logits = logits and expected.dim() == 2
        if expected.dim() == 2:
            agree += (actual.argmax(1) == expected.argmax(1)).sum().item()
    return {
        "max_abs_diff": max_diff,
        "top1_agreement": agree / images if logits else None,
        "batches": per_batch,
        "images": images,
        "finite": finite,
    }
