"""Token reduction for timm Vision Transformers: one mechanism (token state + token maps), many policies."""

from effvision.tokens.blocks import NoReduction, TokenReducingBlocks
from effvision.tokens.flops import count_macs
from effvision.tokens.reduce import METHODS, forward_tokens, reduce, reduction_info
from effvision.tokens.state import TokenState

__all__ = [
    "METHODS",
    "NoReduction",
    "TokenReducingBlocks",
    "TokenState",
    "count_macs",
    "forward_tokens",
    "reduce",
    "reduction_info",
]
