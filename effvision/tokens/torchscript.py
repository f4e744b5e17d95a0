"""TorchScript on token-reduced models (timm's ``--torchscript``): the forward, traced, in eval and in training.

A reduction's control flow (per-image policies, token maps, block extensions) is Python that
``torch.jit.script`` cannot compile. It is, however, written in tensor operations whose shapes follow the
batch (what ONNX export relies on too), so a trace at the model's image size holds for every batch and every
image: PPT's per-image choice between pruning and pooling stays data-dependent in the traced graph.

``torch.jit.script(model)`` therefore calls the model's ``__prepare_scriptable__``, which returns
:class:`TracedInference`: two traces of the model at its image size, one in eval mode and one in training mode
(dropout and drop-path stay random in it), sharing the model's parameters, behind a compiled check of the
input's shape; its ``train()`` / ``eval()`` flag picks the trace. It is a real TorchScript module
(``torch.jit.save`` works) that timm's ``train.py --torchscript`` can train. The training trace is of the model's
train/eval flags as they are when scripted, if it is in training mode then (a frozen part kept in eval stays
so), else of ``model.train()``. Gradient checkpointing does not survive tracing (TorchScript runs the plain
forward). The reduced blocks in a torch.fx graph of the model are scripted the same way (:class:`TracedBlocks`).

``torch.jit.script`` of a module that *holds* a reduced model replaces it in that module (torch's
``__prepare_scriptable__`` works in place). Called from Python, these modules therefore run the Python module
they were made from (same parameters), so the holding module keeps working as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def _train_flags(module: nn.Module, training: bool) -> Iterator[None]:
    """``module`` in training (if it is not already) or eval mode, each sub-module's own flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    if not (training and module.training):  # a model already training keeps its mixed flags
        module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _trace(module: nn.Module, example: tuple[Tensor, ...], training: bool) -> nn.Module:
    """``module``'s forward in training or eval mode, traced on ``example``. Tracing runs the forward once, so
    what that run changes is put back: the caller's random state (a training trace draws dropout masks) and the
    module's buffers (a training forward updates BatchNorm statistics, e.g. in CLCA's aggregation head)."""
    devices = [example[0].device] if example[0].is_cuda else []
    buffers = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        with _train_flags(module, training), torch.no_grad(), torch.random.fork_rng(devices), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values it records
            return torch.jit.trace(module, example, check_trace=False)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _traces(module: nn.Module, example: tuple[Tensor, ...]) -> tuple[nn.Module, nn.Module]:
    """The eval-mode and the training-mode trace of ``module`` (sharing its parameters)."""
    return _trace(module, example, training=False), _trace(module, example, training=True)


def _random(shape: tuple[int, ...], like: Tensor) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


class _TracedOrPython(nn.Module):
    """``inference`` / ``training_forward``: the eval-mode and training-mode traces, what TorchScript runs
    (picked by the module's own train/eval flag); ``python_module``: what Python runs."""

    __jit_ignored_attributes__ = ["python_module"]

    def __init__(self, traces: tuple[nn.Module, nn.Module], python_module: nn.Module) -> None:
        super().__init__()
        self.inference, self.training_forward = traces
        # a 1-tuple, not a sub-module (its parameters are the traces'), which torch.jit.script would replace too
        self.python_module = (python_module,)

    def _python(self) -> nn.Module:
        module = self.python_module[0]
        if module.training != self.training:
            module.train(self.training)
        return module


class TracedInference(_TracedOrPython):
    """A token-reduced model's forward, traced in eval and in training mode, for (B, C, H, W) images of the
    traced size -> what the model's forward returns ((B, num_classes) logits)."""

    def __init__(self, traces: tuple[nn.Module, nn.Module], python_model: nn.Module, channels: int, height: int,
                 width: int) -> None:
        super().__init__(traces, python_model)
        self.channels = channels
        self.height = height
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._python()(x)
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] != self.height or x.shape[3] != self.width:
            raise ValueError(
                "this TorchScript module takes (B, " + str(self.channels) + ", " + str(self.height) + ", "
                + str(self.width) + ") images, the size it was traced at"
            )
        if self.training:
            return self.training_forward(x)
        return self.inference(x)


class TracedBlocks(_TracedOrPython):
    """The reduced blocks' forward, traced in eval and in training mode: (B, N, C) tokens -> what the blocks return."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._python()(x)
        if self.training:
            return self.training_forward(x)
        return self.inference(x)


class TracedRopeBlocks(_TracedOrPython):
    """:class:`TracedBlocks` of an Eva model: (B, N, C) tokens and the RoPE table."""

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._python()(x, rope)
        if self.training:
            return self.training_forward(x, rope)
        return self.inference(x, rope)


def traced_for_torchscript(model: nn.Module) -> TracedInference:
    """:class:`TracedInference` of a token-reduced ``model`` at its patch embedding's image size, on its device
    and dtype, in the model's current train/eval flag."""
    parameter = next(iter(model.parameters()))
    patch_embed = model.patch_embed
    channels = patch_embed.proj.in_channels
    height, width = (int(size) for size in patch_embed.img_size)
    traces = _traces(model, (_random((2, channels, height, width), parameter),))
    return TracedInference(traces, model, channels, height, width).train(model.training)


class _BlocksWithExtensions(nn.Module):
    """The reduced blocks with their extensions (registered on the model, not on the blocks) as sub-modules,
    so that a trace of the blocks keeps the extensions' weights as parameters, not constants."""

    def __init__(self, blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = blocks
        self.extensions = nn.ModuleList(e for e in blocks.extensions if isinstance(e, nn.Module))

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.blocks(*inputs)


def traced_blocks_for_torchscript(blocks: nn.Module) -> TracedBlocks | TracedRopeBlocks:
    """The ``TokenReducingBlocks`` of a reduced model traced on example tokens of the shapes recorded by
    :func:`effvision.reduce` (what a torch.fx graph of the model calls, timm's fx + TorchScript path)."""
    shapes = getattr(blocks, "example_shapes", None)
    if not shapes:
        raise RuntimeError(
            "these token-reducing blocks do not know their input shapes, so TorchScript cannot trace them: "
            "torch.jit.script the whole model made by effvision.reduce / timm.create_model instead"
        )
    parameter = next(iter(blocks.parameters()))
    example = tuple(_random(shape, parameter) for shape in ((2, *shapes[0]), *shapes[1:]))
    kind = TracedBlocks if len(example) == 1 else TracedRopeBlocks
    return kind(_traces(_BlocksWithExtensions(blocks), example), blocks).train(blocks.training)
