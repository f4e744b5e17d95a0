"""Triton kernels beside their PyTorch references, with one dispatch function each."""
