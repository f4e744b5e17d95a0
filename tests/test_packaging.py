"""The distribution ships every package directory and ``import effvision`` stays light."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = {
    "effvision": ROOT / "effvision",
    "effvision.kernels": ROOT / "kernels",
    "effvision.export": ROOT / "export",
}


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for name, directory in PACKAGE_ROOTS.items():
        for init in directory.rglob("__init__.py"):
            relative = init.parent.relative_to(directory).parts
            found.add(".".join((name, *relative)))
    assert found == listed


def test_import_effvision_does_not_pull_heavy_optional_modules():
    code = (
        "import sys, effvision, effvision.kernels, effvision.export;"
        "heavy = [m for m in ('onnxruntime', 'mamba_ssm', 'onnx', 'compressai', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
