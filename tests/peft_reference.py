"""Step-by-step reference computations of Sparse-Tuning and CLCA as the authors' released code does them.

Written plainly from timm's block parts and the method descriptions (issue 14, docs/methods.md), with
its own token reductions (EViT top-k, ToMe, PPT) as dense (B, M, N) matrices: nothing here calls
effvision, so the models under test are checked against independent code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def embed(model, images):
    """The patch-embedding stream (the input of block 0)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def attention(block, x, size, proportional):
    """timm attention of ``block`` on ``x`` (B, N, C), key bias log(size) when proportional.

    Returns (output before LayerScale, attention probabilities (B, H, N, N), head-mean keys, value norms).
    """
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if proportional:
        logits = logits + size.log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, -1)
    value_norm = v.transpose(1, 2).reshape(batch, tokens, -1).norm(dim=-1)
    return attn.proj(attn.norm(out)), probs, k.mean(dim=1), value_norm


def mlp(block, x):
    return block.ls2(block.mlp(block.norm2(x)))


def released_adapter(adapter, x):
    """h = ReLU(W_d1 x); s = W_d2 h; t = W_u1 s; out = W_u2(W_d3 [s; t] + h)."""
    h = F.relu(F.linear(x, adapter.down1.weight, adapter.down1.bias))
    s = F.linear(h, adapter.down2.weight, adapter.down2.bias)
    t = F.linear(s, adapter.up1.weight, adapter.up1.bias)
    u = F.linear(torch.cat([s, t], dim=-1), adapter.down3.weight, adapter.down3.bias)
    return F.linear(u + h, adapter.up2.weight, adapter.up2.bias)


# ---- reductions: (weights (B, M, N): out = weights @ tokens, membership (B, M, N): sizes add) ----------------


def rows(batch, tokens, picks):
    """(B, M, N) one-hot rows from a (B, M) index tensor."""
    return F.one_hot(picks, tokens).float()


def topk_fused(probs, prefix, keep_rate):
    """EViT: keep ceil(keep_rate * patches) by head-mean CLS attention (descending), fuse the rest into one
    token, their attention-weighted sum (last)."""
    batch, _, tokens, _ = probs.shape
    score = probs[:, :, 0, prefix:].mean(dim=1)
    order = score.argsort(dim=-1, descending=True) + prefix
    keep = math.ceil(keep_rate * (tokens - prefix))
    prefix_index = torch.arange(prefix).expand(batch, prefix)
    weights = rows(batch, tokens, torch.cat([prefix_index, order[:, :keep]], dim=1))
    rest = order[:, keep:]
    if rest.shape[1] == 0:
        return weights, weights
    fused = torch.zeros(batch, 1, tokens).scatter(2, rest[:, None], probs[:, :, 0].mean(dim=1).gather(1, rest)[:, None])
    membership = torch.zeros(batch, 1, tokens).scatter(2, rest[:, None], 1.0)
    return torch.cat([weights, fused], dim=1), torch.cat([weights, membership], dim=1)


def bipartite(keys, size, prefix, r):
    """ToMe: even positions (after the prefix) are set A, odd ones set B; the r A tokens with the most
    cosine-similar B match merge into it (size-weighted average). Output: prefix, unmerged A in order,
    all of B in order."""
    batch, tokens, _ = keys.shape
    a_pos = torch.tensor([i for i in range(prefix, tokens) if i % 2 == 0])
    b_pos = torch.tensor([i for i in range(prefix, tokens) if i % 2 == 1])
    metric = keys / keys.norm(dim=-1, keepdim=True)
    best, match = (metric[:, a_pos] @ metric[:, b_pos].transpose(1, 2)).max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    weights, memberships = [], []
    for image in range(batch):
        merged = ranked[image, :r].tolist()
        unmerged = sorted(ranked[image, r:].tolist())
        out_rows = [[i] for i in range(prefix)] + [[a_pos[i].item()] for i in unmerged]
        out_rows += [[b.item()] for b in b_pos]
        first_b = prefix + len(unmerged)
        for a in merged:
            out_rows[first_b + match[image, a].item()].append(a_pos[a].item())
        member = torch.zeros(len(out_rows), tokens)
        for row, sources in enumerate(out_rows):
            member[row, sources] = 1.0
        merged_size = member @ size[image]
        weights.append(member * size[image][None] / merged_size[:, None])
        memberships.append(member)
    return torch.stack(weights), torch.stack(memberships)


def prune(probs, value_norm, prefix, keep):
    """PPT prune: keep the ``keep`` patch tokens of highest significance (descending)."""
    batch, _, tokens, _ = probs.shape
    significance = ppt_significance(probs, value_norm, prefix)
    top = significance.topk(keep, dim=-1).indices + prefix
    weights = rows(batch, tokens, torch.cat([torch.arange(prefix).expand(batch, prefix), top], dim=1))
    return weights, weights


def ppt_significance(probs, value_norm, prefix):
    score = probs[:, :, 0, prefix:].sum(dim=1) * value_norm[:, prefix:]
    return score / score.sum(dim=-1, keepdim=True)


class Reduction:
    """One of the three reductions with its options; ``step`` gives the block's matrices or ``None``."""

    def __init__(self, method, **options):
        self.method, self.options = method, options
        self.proportional = method in ("tome", "ppt")

    def step(self, block_index, probs, keys, value_norm, size, prefix):
        tokens = probs.shape[-1]
        layers = self.options.get("layers", (3, 6, 9))
        if self.method == "topk":
            return topk_fused(probs, prefix, self.options["keep_rate"]) if block_index in layers else None
        if self.method == "tome":
            return bipartite(keys, size, prefix, min(self.options["r"], (tokens - prefix) // 2))
        if block_index not in layers:
            return None
        r = min(self.options["r"], (tokens - prefix) // 2)
        pool = bipartite(keys, size, prefix, r)
        cut = prune(probs, value_norm, prefix, tokens - prefix - r)
        use_pool = (ppt_significance(probs, value_norm, prefix).var(dim=-1) < self.options["threshold"])[:, None, None]
        return torch.where(use_pool, pool[0], cut[0]), torch.where(use_pool, pool[1], cut[1])


def classify(model, x):
    """timm's final norm and class-token head."""
    return model.head(model.fc_norm(model.norm(x)[:, 0]))


def sparse_tuning_reference(model, images, reduction, stage_ends=(2, 5, 8, 11)):
    """Released Sparse-Tuning: per-block adapters beside the MLP on the post-reduction stream; per stage,
    the adapter outputs (and, for the first stage, the patch-embedding stream) are added after the stage's
    last block; the last block's adapter is left out of the last sum."""
    x = embed(model, images)
    size = torch.ones(x.shape[:2])
    prefix = model.num_prefix_tokens
    depth = len(model.blocks)
    stage = [x]
    for index, block in enumerate(model.blocks):
        out, probs, keys, value_norm = attention(block, x, size, reduction.proportional)
        x = x + block.ls1(out)
        step = reduction.step(index, probs, keys, value_norm, size, prefix)
        if step is not None:
            weights, membership = step
            x, size = weights @ x, (membership @ size[..., None])[..., 0]
            stage = [weights @ t for t in stage]
        adapter_out = released_adapter(model.dense_adapters.adapters[index], x)
        x = x + mlp(block, x) + adapter_out
        if index < depth - 1:
            stage.append(adapter_out)
        if index in stage_ends:
            x = x + sum(stage)
            stage = []
    return classify(model, x)


def aggregation_head(head, cls_tokens):
    """CLCA head: (B, L, D) -> BN(D) -> depthwise conv -> BN(2D) -> GELU -> pointwise conv."""
    x = cls_tokens.transpose(1, 2)
    x = F.batch_norm(
        x,
        head.norm_in.running_mean,
        head.norm_in.running_var,
        head.norm_in.weight,
        head.norm_in.bias,
        eps=head.norm_in.eps,
    )
    x = torch.einsum("bdl,dkl->bdk", x, head.depthwise.weight.reshape(x.shape[1], 2, -1)).reshape(x.shape[0], -1)
    x = x + head.depthwise.bias
    x = (x - head.norm_mid.running_mean) / (head.norm_mid.running_var + head.norm_mid.eps).sqrt()
    x = F.gelu(x * head.norm_mid.weight + head.norm_mid.bias)
    return x @ head.pointwise.weight[..., 0].T + head.pointwise.bias


def clca_reference(model, images, reduction, cache_layers, head_layers, carriers=None, average=True):
    """Released CLCA (its ``forward`` loop): after block i, if i is a cache layer, note the length L and
    append the cached tokens at the end of the sequence (size 1) and clear the cache; then, if i comes
    before the last cache layer, cache the plain mean of the tokens at positions prefix..L and the last K
    tokens (carriers). Later reductions treat appended tokens like patches. ``carriers``: (tokens, position
    embedding or None), each (1, K, D), appended after the patches at the input."""
    x = model.patch_drop(model._pos_embed(model.patch_embed(images)))
    batch = x.shape[0]
    prefix = model.num_prefix_tokens
    pool_end = x.shape[1]
    carrier_count = 0 if carriers is None else carriers[0].shape[1]
    if carrier_count:  # appended with the position embedding, before the model's norm_pre (as released)
        tokens = carriers[0] if carriers[1] is None else carriers[0] + carriers[1]
        x = torch.cat([x, tokens.expand(batch, -1, -1)], dim=1)
    x = model.norm_pre(x)
    size = torch.ones(x.shape[:2])
    cache, cls_tokens = [], []
    for index, block in enumerate(model.blocks):
        out, probs, keys, value_norm = attention(block, x, size, reduction.proportional)
        x = x + block.ls1(out)
        step = reduction.step(index, probs, keys, value_norm, size, prefix)
        if step is not None:
            weights, member = step
            x, size = weights @ x, (member @ size[..., None])[..., 0]
        x = x + mlp(block, x)
        if index in head_layers:
            cls_tokens.append(x[:, 0])
        if index in cache_layers:
            pool_end = x.shape[1]
            injected = torch.cat(cache, dim=1) if cache else x[:, :0]  # block 0: nothing cached yet
            x = torch.cat([x, injected], dim=1)
            size = torch.cat([size, torch.ones(batch, injected.shape[1])], dim=1)
            cache = []
        if index < max(cache_layers):
            if average:
                cache.append(x[:, prefix:pool_end].mean(dim=1, keepdim=True))
            if carrier_count:
                cache.append(x[:, -carrier_count:])
    return aggregation_head(model.head, torch.stack(cls_tokens, dim=1)), x.shape[1]
