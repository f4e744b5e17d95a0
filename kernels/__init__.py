"""Triton kernels beside their PyTorch references, with one dispatch function each.

Importing this package does not import Triton; the Triton kernels load on first use.
"""

from .selective_scan import selective_scan, selective_scan_ref
from .token_gather import gather_tokens, gather_tokens_ref
from .token_merge import merge_tokens, merge_tokens_ref, size_weighted_merge, size_weighted_merge_ref

__all__ = [
    "gather_tokens",
    "gather_tokens_ref",
    "merge_tokens",
    "merge_tokens_ref",
    "selective_scan",
    "selective_scan_ref",
    "size_weighted_merge",
    "size_weighted_merge_ref",
]
