"""timm attention with proportional attention and the statistics token policies need.

The attention output goes through ``F.scaled_dot_product_attention`` exactly as in timm's
``Attention``, ``EvaAttention`` (EVA-02: q/v biases, separate q/k/v projections) and ``AttentionRope``
(RoPE ViTs, grouped-query attention); token sizes enter as an additive ``log(size)`` key bias
(proportional attention, ToMe / PPT). RoPE rotates the patch tokens' queries and keys with the
per-token embedding the caller passes (each token's carried position, see ``TokenState.rope_embedding``).
Policies often need more than the output:

* ``keys``: keys averaged over heads, (B, N, head_dim): ToMe's similarity metric. Taken before RoPE, so
  the similarity of two tokens is that of their content, not of their positions.
* ``cls_attention``: attention of the first (CLS) query over all keys, (B, H, N). Computed as one
  extra row (softmax of ``q_cls . k``), so the full (N, N) attention matrix is never materialised.
* ``value_norm``: L2 norm of each token's value vector over all heads, (B, N): PPT's score.
"""

from __future__ import annotations

import functools
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


def size_bias(size: Tensor | None, like: Tensor) -> Tensor | None:
    """Additive key bias log(size), (B, 1, 1, N), in the dtype of ``like``, or None when all sizes are one.

    Dtypes here and below are taken from tensors (``type_as``), not as ``x.dtype`` values: a TorchScript
    trace would keep those as constants, and a script module cast to bfloat16 after tracing then failed."""
    if size is None:
        return None
    return size.log().type_as(like)[:, None, None, :]


@functools.cache
def timm_attention_forwards() -> frozenset:
    """The ``forward`` functions of timm's attention classes that :func:`attention_with_statistics` computes
    from their parts: ``Attention``, ``EvaAttention`` and ``AttentionRope``."""
    from timm.layers.attention import Attention, AttentionRope
    from timm.models.eva import EvaAttention

    return frozenset((Attention.forward, EvaAttention.forward, AttentionRope.forward))


def check_attention_module(attn: nn.Module, where: str = "") -> None:
    """Raise ValueError unless ``attn`` is timm's self-attention (``Attention``, ``EvaAttention`` or
    ``AttentionRope``, or a subclass keeping their ``forward``): a fused qkv projection or separate q/k/v
    projections. The reduced blocks compute attention from these parts and never call ``attn.forward``, so
    another forward (timm's ``DiffAttention``, a user's replacement) would be skipped silently."""
    name = type(attn).__name__
    if type(attn).forward not in timm_attention_forwards():
        raise ValueError(
            f"unsupported attention module {where}{name}: token reduction computes timm's Attention / "
            f"EvaAttention / AttentionRope from their parts (qkv, norms, proj), so a module with another "
            f"forward would be skipped; hooks on the attention module do run"
        )
    required = ("num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")
    missing = [name for name in required if not hasattr(attn, name)]
    fused = isinstance(getattr(attn, "qkv", None), nn.Linear)
    separate = all(isinstance(getattr(attn, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj"))
    if missing or not (fused or separate):
        raise ValueError(
            f"unsupported attention module {where}{name}: token reduction needs timm's "
            f"Attention / EvaAttention / AttentionRope (missing {missing or ['qkv or q/k/v projections']})"
        )


def project_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values (B, heads, N, head_dim) as timm computes them (k/v may have fewer heads
    under grouped-query attention)."""
    batch, tokens, _ = x.shape
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:  # EVA: q and v biases, zero k bias, outside the (bias-free) qkv Linear
            qkv_bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v
    kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
    q = attn.q_proj(x).reshape(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).reshape(batch, tokens, kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).reshape(batch, tokens, kv_heads, attn.head_dim).transpose(1, 2)
    return q, k, v


def rotate_patch_tokens(attn: nn.Module, t: Tensor, rope: Tensor, num_prefix: int, like: Tensor) -> Tensor:
    """timm's RoPE step: rotate the patch tokens of ``t`` (B, H, N, d) with ``rope``; prefix tokens stay."""
    from timm.layers import apply_rot_embed_cat

    rotated = apply_rot_embed_cat(t[:, :, num_prefix:, :], rope, half=getattr(attn, "rotate_half", False))
    return torch.cat([t[:, :, :num_prefix, :], rotated], dim=2).type_as(like)


def attention_with_statistics(
    attn: nn.Module,
    x: Tensor,
    bias: Tensor | None,
    need: frozenset[str] = frozenset(),
    rope: Tensor | None = None,
    num_prefix: int = 0,
) -> tuple[Tensor, AttentionStatistics]:
    """timm attention on ``x`` (B, N, C) with an additive key ``bias``, plus statistics.

    ``rope`` (B, 1 or heads, N - num_prefix, D): per-token RoPE of the patch tokens, ``None`` without RoPE.
    Returns the attention output (B, N, C_out) and the requested :class:`AttentionStatistics`.
    """
    batch, tokens, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    q, k, v = project_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    content_keys = k
    if rope is not None:
        q = rotate_patch_tokens(attn, q, rope, num_prefix, v)
        k = rotate_patch_tokens(attn, k, rope, num_prefix, v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        content_keys = content_keys.repeat_interleave(groups, dim=1)
    mask = None if bias is None else bias.type_as(q)

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
        statistics.keys = content_keys.mean(dim=1)
    if "cls_attention" in need:
        cls_logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        if mask is not None:
            cls_logits = cls_logits + mask
        statistics.cls_attention = cls_logits.float().softmax(dim=-1).squeeze(2)
    if "value_norm" in need:
        statistics.value_norm = v.transpose(1, 2).flatten(2).float().norm(dim=-1)

    out = out.transpose(1, 2).flatten(2)  # (B, N, H*d); flatten, not reshape(-1), so B = 0 works
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), statistics
