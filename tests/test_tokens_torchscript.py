"""TorchScript (timm's ``--torchscript``, its torchscript and fx + torchscript model tests) on reduced and PEFT
names: ``torch.jit.script`` gives the forward traced in eval and in training mode (effvision.tokens.torchscript),
which must equal the Python model on other batch sizes and on images that take different per-image paths, and
train as it does (train.py --torchscript). Tiny models."""

import warnings

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules

import effvision  # noqa: F401
from tests.vit_factory import mix_ppt_choices

NAMES = (
    "ppt_vit_tiny_patch16_224", "tome_vit_tiny_patch16_224", "topk_vit_tiny_patch16_224",
    "sparse_tuning_vit_tiny_patch16_224", "clca_ppt_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224",
    "ppt_eva02_tiny_patch14_224",
)


def model_of(name: str, **kwargs) -> torch.nn.Module:
    """Random weights with every parameter perturbed, so zero-initialised adapter branches take part."""
    torch.manual_seed(0)
    model = timm.create_model(name, depth=4, **kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def images(batch: int, size: int = 224, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation of torch.jit.script
        return torch.jit.script(module)


@pytest.mark.parametrize("name", NAMES)
def test_scripted_model_equals_the_model_at_other_batch_sizes(name):
    model = model_of(name)
    scripted = script(model)  # traced at batch 2
    with torch.no_grad():
        for batch in (1, 5):
            x = images(batch)
            torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-5)


def test_scripted_ppt_keeps_the_per_image_choice_between_pruning_and_pooling():
    model = model_of("ppt_vit_tiny_patch16_224")
    x = images(6)
    mix_ppt_choices(model, x)  # half the images pool at the first reduction
    scripted = script(model)  # traced on other (random) images
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-5)


def test_scripted_model_saves_loads_and_refuses_other_sizes(tmp_path):
    model = model_of("clca_ppt_vit_tiny_patch16_224")
    scripted = script(model)
    torch.jit.save(scripted, tmp_path / "model.pt")
    loaded = torch.jit.load(tmp_path / "model.pt")
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)
        with pytest.raises(Exception, match="224, 224"):
            loaded(images(1, size=192))
        loaded.train()
        with pytest.raises(Exception, match="224, 224"):
            loaded(images(1, size=192))


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["ppt_vit_tiny_patch16_224", "tome_vit_tiny_patch16_224",
                                  "clca_sparse_tuning_vit_tiny_patch16_224", "ppt_eva02_tiny_patch14_224"])
def test_scripted_model_trains_as_the_model_with_dropout_and_drop_path(name):
    """timm's train.py --torchscript trains the scripted model: in training mode it runs the training trace,
    whose dropout and drop-path masks are drawn afresh each call, on the model's own parameters."""
    model = model_of(name, drop_rate=0.2, drop_path_rate=0.3, num_classes=5).train()
    scripted = script(model)
    assert {id(p) for p in scripted.parameters()} == {id(p) for p in model.parameters()}
    x = images(3)
    torch.manual_seed(7)
    scripted(x).logsumexp(-1).mean().backward()
    from_script = gradients(model)
    model.zero_grad()
    torch.manual_seed(7)
    model(x).logsumexp(-1).mean().backward()
    from_python = gradients(model)
    assert from_script.keys() == from_python.keys() and from_python
    for key in from_python:
        torch.testing.assert_close(from_script[key], from_python[key], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.manual_seed(1)
        first = scripted(x)
        assert not torch.equal(first, scripted(x))  # new masks each call
        scripted.eval()
        torch.testing.assert_close(scripted(x), model.eval()(x), rtol=0, atol=1e-5)
        assert not torch.allclose(first, scripted(x))


def test_scripted_ppt_trains_with_the_per_image_choice_and_an_optimizer_step_reaches_the_model():
    model = model_of("ppt_vit_tiny_patch16_224")
    x = images(6)
    mix_ppt_choices(model, x)
    scripted = script(model.train())
    optimizer = torch.optim.SGD(scripted.parameters(), lr=0.1)
    scripted(x).logsumexp(-1).mean().backward()
    expected = gradients(model)
    model.zero_grad()
    model(x).logsumexp(-1).mean().backward()
    for key, grad in gradients(model).items():
        torch.testing.assert_close(expected[key], grad, rtol=0, atol=1e-6)
    before = model.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.head.weight, before)


class Holder(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_a_module_holding_a_reduced_model_scripts_and_still_trains_in_python():
    """torch.jit.script replaces the held model inside the holder (``__prepare_scriptable__`` works in place);
    from Python the holder must still run, and train, the very same model."""
    model = model_of("clca_ppt_vit_tiny_patch16_224")
    holder = Holder(model)
    scripted = script(holder)
    x = images(3)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(holder(x), expected, rtol=0, atol=0)
    assert {id(p) for p in holder.parameters()} == {id(p) for p in model.parameters()}
    holder.train()
    holder(x).logsumexp(-1).mean().backward()
    assert model.training and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("training", [False, True])
def test_scripting_leaves_the_models_buffers_as_they_were(training):
    """Tracing runs the forward, in training mode too: CLCA's aggregation head has BatchNorm statistics, which
    that run must not move (the eval output of the model scripted in eval mode changed by 0.07)."""
    model = model_of("clca_topk_vit_tiny_patch16_224").train(training)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert any("running_mean" in name for name in before)
    script(model)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0)


def test_scripting_leaves_every_train_flag_of_the_model_as_it_was():
    model = model_of("sparse_tuning_vit_tiny_patch16_224").train()
    model.blocks[0].eval()  # a mixed state must survive
    flags = {name: m.training for name, m in model.named_modules()}
    assert script(model).training
    assert {name: m.training for name, m in model.named_modules()} == flags


@pytest.mark.parametrize("name", ["ppt_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224",
                                  "ppt_eva02_tiny_patch14_224"])
def test_fx_graph_of_the_model_scripts_and_equals_the_model(name):
    """timm's test_model_forward_fx_torchscript: the blocks are one fx leaf; scripting traces them."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = model_of(name)
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer).eval()
    scripted = script(extractor)
    x = images(3)
    with torch.no_grad():
        (out,) = scripted(x).values()
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)


def test_torch_compile_runs_the_reduction_in_eval_and_training():
    """timm's ``--torchcompile``: torch.compile (inductor, graph breaks where the reduction needs them)."""
    model = model_of("ppt_vit_tiny_patch16_224", img_size=112, r=8, num_classes=5)
    compiled = torch.compile(model)
    x = images(3, size=112)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    compiled(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["tome_vit_tiny_patch16_224", "clca_ppt_vit_tiny_patch16_224",
                                  "ppt_eva02_tiny_patch14_224"])
def test_a_script_module_cast_to_bfloat16_after_scripting_equals_the_cast_model(name):
    """The traces take every dtype from tensors (type_as, new_ones), not as constants: a script module cast after
    scripting failed with 'mixed dtype (CPU): expect parameter to have scalar type of Float'."""
    model = model_of(name)
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3)).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    scripted.to(torch.bfloat16)
    with torch.no_grad():
        got = scripted(x)
        expected = model.to(torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tome_vit_tiny_patch16_224", "ppt_vit_tiny_patch16_224",
                                  "clca_ppt_vit_tiny_patch16_224", "tome_eva02_tiny_patch14_224"])
def test_the_traces_name_no_device(name):
    """Index tensors follow the input's device (index_range, new_ones): arange(..., device=x.device) was kept in
    the trace as the CPU, so a script module moved to CUDA would have made its indices on the CPU."""
    model = model_of(name, track_source=True) if name.startswith("tome") else model_of(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    devices = [node for trace in (scripted.inference, scripted.training_forward)
               for node in trace.inlined_graph.nodes()
               if node.kind() == "prim::Constant" and str(node.output().type()) == "Device"]
    assert devices == []
