"""Backend selection of the kernel dispatch functions and its error messages."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from effvision.kernels import _dispatch, merge_tokens, merge_tokens_ref, selective_scan, size_weighted_merge_ref

CUDA_TENSOR = SimpleNamespace(device=torch.device("cuda"))  # stands in for a CUDA tensor on a CPU machine


def scan_inputs():
    return dict(
        u=torch.randn(1, 4, 5), delta=torch.rand(1, 4, 5), A=-torch.rand(4, 2),
        B=torch.randn(1, 2, 5), C=torch.randn(1, 2, 5),
    )


def test_auto_picks_torch_for_cpu_tensors():
    assert _dispatch.resolve_backend("auto", (torch.zeros(1),), "op") == "torch"


def test_auto_picks_triton_for_cuda_tensors_when_triton_is_installed(monkeypatch):
    monkeypatch.setattr(_dispatch, "module_available", lambda name: True)
    assert _dispatch.resolve_backend("auto", (CUDA_TENSOR, None), "op") == "triton"


def test_auto_falls_back_to_torch_without_triton(monkeypatch):
    monkeypatch.setattr(_dispatch, "module_available", lambda name: False)
    assert _dispatch.resolve_backend("auto", (CUDA_TENSOR,), "op") == "torch"


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_dispatch, "module_available", lambda name: True)
    with pytest.raises(RuntimeError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        selective_scan(**scan_inputs(), backend="triton")


def test_triton_without_the_package_says_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(_dispatch, "module_available", lambda name: False)
    x = torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match="'triton' package, which is not installed"):
        merge_tokens(x, torch.zeros(1, 2, dtype=torch.long), backend="triton")


def test_triton_on_cpu_is_allowed_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "module_available", lambda name: True)
    assert _dispatch.resolve_backend("triton", (torch.zeros(1),), "op") == "triton"


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of .*'torch'.*'triton'.*'mamba_ssm'"):
        selective_scan(**scan_inputs(), backend="cuda")


def test_mamba_ssm_backend_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(_dispatch, "module_available", lambda name: name != "mamba_ssm")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        selective_scan(**scan_inputs(), backend="mamba_ssm")


def test_torch_backend_is_the_reference():
    x = torch.randn(2, 6, 3)
    keep = torch.tensor([[0, 2], [5, 1]])
    src, dst = torch.tensor([[1, 3], [0, 4]]), torch.tensor([[0, 0], [1, 1]])
    assert torch.equal(merge_tokens(x, keep, src, dst, backend="torch"), merge_tokens_ref(x, keep, src, dst))


def test_poisoned_outputs_are_nan():
    previous = _dispatch.poison_outputs
    _dispatch.poison_outputs = True
    try:
        assert torch.isnan(_dispatch.new_output((3, 2), torch.float16, torch.device("cpu"))).all()
    finally:
        _dispatch.poison_outputs = previous


def test_importing_kernels_does_not_load_triton_kernel_modules():
    code = (
        "import sys, effvision.kernels;"
        "print(sorted(m for m in sys.modules if m.startswith('effvision.kernels._') and 'triton' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_scan_rejects_groups_that_do_not_divide_channels():
    inputs = scan_inputs()
    inputs["B"] = inputs["C"] = torch.randn(1, 3, 2, 5)  # 4 channels, 3 groups
    with pytest.raises(ValueError, match="divisible by groups"):
        selective_scan(**inputs)


@pytest.mark.parametrize("option", ["D", "delta_bias", "z"])
def test_scan_refuses_a_D_z_or_delta_bias_of_another_shape(option):
    """The PyTorch path broadcast them silently and the Triton kernel read past their buffers."""
    batch, dim, state, length = 2, 4, 3, 5
    u, delta = torch.randn(batch, dim, length), torch.rand(batch, dim, length)
    A, B, C = -torch.rand(dim, state), torch.randn(batch, state, length), torch.randn(batch, state, length)
    wrong = {"D": torch.ones(1), "delta_bias": torch.zeros(1), "z": torch.randn(batch, dim, 1)}
    with pytest.raises(ValueError, match=f"{option} must have shape"):
        selective_scan(u, delta, A, B, C, backend="torch", **{option: wrong[option]})


def test_size_weighted_merge_reference_keeps_float64():
    x, size = torch.randn(1, 5, 3, dtype=torch.float64), torch.rand(1, 5, dtype=torch.float64) + 0.5
    keep, src, dst = torch.tensor([[0, 1]]), torch.tensor([[2, 3, 4]]), torch.tensor([[0, 1, 1]])
    merged, merged_size = size_weighted_merge_ref(x, size, keep, src, dst)
    expected = torch.stack([(x[0, [0, 2]] * size[0, [0, 2], None]).sum(0) / size[0, [0, 2]].sum(),
                            (x[0, [1, 3, 4]] * size[0, [1, 3, 4], None]).sum(0) / size[0, [1, 3, 4]].sum()])
    assert merged.dtype == torch.float64 and torch.allclose(merged[0], expected, rtol=1e-14, atol=0)
    assert torch.allclose(merged_size[0], torch.stack([size[0, [0, 2]].sum(), size[0, [1, 3, 4]].sum()]), rtol=1e-14)


def test_a_broken_triton_install_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(_dispatch, "module_available", lambda name: True)
    monkeypatch.setattr(_dispatch, "import_failure", lambda name: f"the {name!r} package fails to import (boom)")
    _dispatch._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="fails to import .boom.; using the PyTorch reference"):
        assert _dispatch.resolve_backend("auto", (CUDA_TENSOR,), "op") == "torch"
    with pytest.raises(RuntimeError, match="triton backend: the 'triton' package fails to import"):
        _dispatch.resolve_backend("triton", (CUDA_TENSOR,), "op")


def test_import_failure_names_the_error_of_a_broken_package(tmp_path, monkeypatch):
    package = tmp_path / "effvision_broken_test_package"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libcuda.so.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    failure = _dispatch.import_failure("effvision_broken_test_package")
    assert failure is not None and "installed but fails to import (OSError: libcuda.so.1" in failure
    assert _dispatch.import_failure("json") is None


def test_a_broken_mamba_ssm_install_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_dispatch, "module_available", lambda name: True)
    monkeypatch.setattr(_dispatch, "import_failure", lambda name: f"the {name!r} package fails to import (boom)")
    with pytest.raises(RuntimeError, match="mamba_ssm backend: the 'mamba_ssm' package fails to import"):
        selective_scan(**scan_inputs(), backend="mamba_ssm")
