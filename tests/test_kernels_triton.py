"""Runs the Triton kernel tests in a subprocess with TRITON_INTERPRET=1 set before Triton is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

INTERPRETER_TESTS = ["test_kernels_triton_scan.py", "test_kernels_triton_tokens.py"]


def test_triton_kernels_match_references_under_the_interpreter():
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    command += [str(here / name) for name in INTERPRETER_TESTS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=here.parent)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " skipped" not in report.splitlines()[-1], report  # the interpreter really took effect
