"""Test-session settings shared by every test file."""

import os

import torch

# The Triton kernel tests only work when TRITON_INTERPRET=1 is set before Triton is imported;
# tests/test_kernels_triton.py runs them in such a subprocess (and fails if they are skipped there).
collect_ignore = []
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore += ["test_kernels_triton_scan.py", "test_kernels_triton_tokens.py"]

# pytest-xdist runs one worker per core: one torch thread each avoids oversubscribing the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
