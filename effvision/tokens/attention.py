"""timm attention with proportional attention and the statistics token policies need.

The attention output goes through ``F.scaled_dot_product_attention`` exactly as in timm's
``Attention`` (fused path kept); token sizes enter as an additive ``log(size)`` key bias
(proportional attention, ToMe / PPT). Policies often need more than the output:

* ``keys``: keys averaged over heads, (B, N, head_dim): ToMe's similarity metric.
* ``cls_attention``: attention of the first (CLS) query over all keys, (B, H, N). Computed as one
  extra row (softmax of ``q_cls . k``), so the full (N, N) attention matrix is never materialised.
* ``value_norm``: L2 norm of each token's value vector over all heads, (B, N): PPT's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STATISTICS = ("keys", "cls_attention", "value_norm")


@dataclass
class AttentionStatistics:
    keys: Tensor | None = None
    cls_attention: Tensor | None = None
    value_norm: Tensor | None = None


def size_bias(size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive key bias log(size), (B, 1, 1, N), or None when all sizes are one."""
    if size is None:
        return None
    return size.log().to(dtype)[:, None, None, :]


def check_attention_module(attn: nn.Module) -> None:
    """Raise ValueError unless ``attn`` is timm's standard (fused-qkv) self-attention."""
    required = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")
    missing = [name for name in required if not hasattr(attn, name)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise ValueError(
            f"unsupported attention module {type(attn).__name__}: token reduction needs timm's "
            f"Attention with a fused qkv projection (missing {missing or ['qkv Linear']})"
        )


def attention_with_statistics(
    attn: nn.Module,
    x: Tensor,
    bias: Tensor | None,
    need: frozenset[str] = frozenset(),
) -> tuple[Tensor, AttentionStatistics]:
    """timm ``Attention.forward`` on ``x`` (B, N, C) with an additive key ``bias``, plus statistics.

    Returns the attention output (B, N, C_out) and the requested :class:`AttentionStatistics`.
    """
    batch, tokens, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if bias is None else bias.to(q.dtype)

    if getattr(attn, "fused_attn", True):
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v

    statistics = AttentionStatistics()
    if "keys" in need:
        statistics.keys = k.mean(dim=1)
    if "cls_attention" in need:
        cls_logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        if mask is not None:
            cls_logits = cls_logits + mask
        statistics.cls_attention = cls_logits.float().softmax(dim=-1).squeeze(2)
    if "value_norm" in need:
        statistics.value_norm = v.transpose(1, 2).reshape(batch, tokens, -1).float().norm(dim=-1)

    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), statistics
