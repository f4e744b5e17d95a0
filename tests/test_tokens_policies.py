"""PPT / ToMe / top-k against independent reference computations written here from the papers."""

import math

import pytest
import torch
import torch.nn.functional as F

import effvision
from effvision.tokens import TokenState, forward_tokens
from effvision.tokens.policies import parse_r_schedule
from tests.vit_factory import clone_model, deit_small, make_family


# ---------------------------------------------------------------- independent references
def explicit_attention(attn, x, size):
    """timm attention written out with the full (N, N) probability matrix and a log(size) bias."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    logits = q @ k.transpose(-2, -1) * attn.scale + size.log()[:, None, None, :]
    probs = logits.softmax(-1)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(batch, tokens, -1))
    return out, probs, k, v


def tome_merge_reference(x, size, keys, r):
    """ToMe as published: A = even indices (CLS included, never merged), B = odd; scatter-add merge."""
    metric = keys.mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True)[..., None]
    unmerged = edges[:, r:].sort(dim=1).values
    merged, dst = edges[:, :r], node_idx[..., None].gather(1, edges[:, :r])

    def merge(t):
        a, b = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        kept = a.gather(1, unmerged.expand(-1, -1, c))
        src = a.gather(1, merged.expand(-1, -1, c))
        b = b.scatter_reduce(1, dst.expand(-1, -1, c), src, reduce="sum")
        return torch.cat([kept, b], dim=1)

    new_size = merge(size[..., None])
    return merge(x * size[..., None]) / new_size, new_size[..., 0]


def ppt_scores_reference(probs, v):
    batch, heads, tokens, head_dim = v.shape
    value_norm = v.transpose(1, 2).reshape(batch, tokens, heads * head_dim).norm(dim=-1)
    score = probs[:, :, 0, 1:].sum(dim=1) * value_norm[:, 1:]
    return score / score.sum(dim=-1, keepdim=True)


def first_block_reference(model, tokens, method, r=None, keep_rate=None):
    """Block 0 of ``model`` with a reduction between attention and MLP, all computed explicitly."""
    block = model.blocks[0]
    size = torch.ones(tokens.shape[:2])
    out, probs, k, v = explicit_attention(block.attn, block.norm1(tokens), size)
    x = tokens + out
    if method == "prune":
        scores = ppt_scores_reference(probs, v)
        keep = scores.topk(scores.shape[1] - r, dim=-1).indices + 1
        x = torch.cat([x[:, :1], x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
        size = torch.ones(x.shape[:2])
    elif method == "pool":
        x, size = tome_merge_reference(x, size, k, r)
    elif method == "topk":
        cls_attention = probs[:, :, 0, 1:].mean(dim=1)
        order = cls_attention.argsort(dim=-1, descending=True)
        kept = math.ceil(keep_rate * cls_attention.shape[1])
        top, rest = order[:, :kept], order[:, kept:]
        patches = x[:, 1:]
        gather = lambda idx: patches.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        fused = (gather(rest) * cls_attention.gather(1, rest)[..., None]).sum(dim=1, keepdim=True)
        x = torch.cat([x[:, :1], gather(top), fused], dim=1)
        size = None
    x = x + block.mlp(block.norm2(x))
    return x, size, probs, v


def first_block_effvision(model, tokens):
    blocks = model.blocks
    return blocks.run_block(0, blocks[0], TokenState.start(tokens, blocks.num_prefix))


def embed(model, images):
    return model._pos_embed(model.patch_embed(images))


# ---------------------------------------------------------------- PPT
@pytest.mark.parametrize(("threshold", "branch"), [(0.0, "prune"), (math.inf, "pool")])
def test_ppt_threshold_forces_branch_and_matches_reference(threshold, branch):
    model = effvision.reduce(make_family("vit", seed=3), "ppt", r=9, layers=(0,), threshold=threshold)
    tokens = embed(model, torch.randn(4, 3, 64, 64))
    with torch.no_grad():
        expected_x, expected_size, _, _ = first_block_reference(model, tokens, branch, r=9)
        state = first_block_effvision(model, tokens)
    torch.testing.assert_close(state.x, expected_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.size, expected_size)


def test_ppt_chooses_per_image_by_score_variance():
    model = effvision.reduce(make_family("vit", seed=4), "ppt", r=9, layers=(0,))
    tokens = embed(model, torch.randn(6, 3, 64, 64) * torch.linspace(0.2, 3.0, 6)[:, None, None, None])
    with torch.no_grad():
        pooled, pooled_size, probs, v = first_block_reference(model, tokens, "pool", r=9)
        pruned, pruned_size, _, _ = first_block_reference(model, tokens, "prune", r=9)
        variance = ppt_scores_reference(probs, v).var(dim=-1)
        threshold = variance.median().item()
        model.blocks.policy.threshold = threshold
        state = first_block_effvision(model, tokens)
    pool = variance < threshold
    assert 0 < pool.sum() < len(pool), "test needs images on both sides of the threshold"
    for image in range(len(pool)):
        expected = (pooled if pool[image] else pruned)[image]
        expected_size = (pooled_size if pool[image] else pruned_size)[image]
        torch.testing.assert_close(state.x[image], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.size[image], expected_size)


def test_ppt_deit_small_token_schedule_and_macs():
    model = effvision.reduce(deit_small(), "ppt")
    info = effvision.reduction_info(model)
    assert info["tokens"][:4] == [197] * 4
    assert sorted(set(info["tokens"]), reverse=True) == [197, 147, 97, 49]
    assert info["tokens_after"][-1] == 49
    assert info["macs_ratio"] <= 0.65
    assert abs(info["base_gmacs"] - 4.6) < 0.05 and abs(info["gmacs"] - 2.9) < 0.1
    with torch.no_grad():
        state = forward_tokens(model, torch.randn(2, 3, 224, 224))
    assert state.x.shape == (2, 49, 384)


def test_pruning_drops_sizes_and_pooling_conserves_them():
    for threshold, conserved in ((0.0, False), (math.inf, True)):
        model = effvision.reduce(make_family("vit", seed=5), "ppt", r=8, layers=(1, 3), threshold=threshold)
        with torch.no_grad():
            state = forward_tokens(model, torch.randn(3, 3, 64, 64))
        total = state.size.sum(dim=1)
        if conserved:
            torch.testing.assert_close(total, torch.full((3,), 65.0))
        else:
            torch.testing.assert_close(state.size, torch.ones_like(state.size))
            torch.testing.assert_close(total, torch.full((3,), float(state.num_tokens)))


# ---------------------------------------------------------------- ToMe
def test_tome_block_matches_reference_merge():
    model = effvision.reduce(make_family("vit", seed=6), "tome", r=[11])
    tokens = embed(model, torch.randn(3, 3, 64, 64))
    with torch.no_grad():
        expected_x, expected_size, _, _ = first_block_reference(model, tokens, "pool", r=11)
        state = first_block_effvision(model, tokens)
    torch.testing.assert_close(state.x, expected_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.size, expected_size)


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "register_tokens", "no_class_token"])
def test_tome_conserves_size_and_keeps_prefix_tokens(family):
    model = effvision.reduce(make_family(family, seed=7), "tome", r=5, track_source=True)
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        state = forward_tokens(model, torch.randn(2, 3, 64, 64))
    assert state.num_tokens == 64 + prefix - 6 * 5
    torch.testing.assert_close(state.size.sum(dim=1), torch.full((2,), 64.0 + prefix))
    torch.testing.assert_close(state.source.sum(dim=1), torch.ones(2, 64 + prefix))  # every patch once
    torch.testing.assert_close(state.source.sum(dim=2), state.size)
    for token in range(prefix):
        torch.testing.assert_close(state.source[:, token], F.one_hot(torch.tensor([token, token]), 64 + prefix).float())


def test_tome_without_class_token_keeps_the_release_order_of_unmerged_tokens():
    """The released bipartite matching sorts the unmerged A tokens back into sequence order only when there is
    a class token; without one they stay in descending order of their best match, and the next block's A/B
    split follows that order. Whole model, every block, against that reference (proportional attention)."""
    model = effvision.reduce(make_family("no_class_token", seed=8), "tome", r=5)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        size = torch.ones(x.shape[:2])
        for block in model.blocks:
            out, _, k, _ = explicit_attention(block.attn, block.norm1(x), size)
            x = x + out
            metric = k.mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            node_max, node_idx = (metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)).max(dim=-1)
            edges = node_max.argsort(dim=-1, descending=True)[..., None]
            unmerged, merged = edges[:, 5:], edges[:, :5]  # no class token: not sorted
            dst = node_idx[..., None].gather(1, merged)

            def merge(t, unmerged=unmerged, merged=merged, dst=dst):
                a, b, c = t[:, ::2], t[:, 1::2], t.shape[-1]
                b = b.scatter_reduce(1, dst.expand(-1, -1, c), a.gather(1, merged.expand(-1, -1, c)), reduce="sum")
                return torch.cat([a.gather(1, unmerged.expand(-1, -1, c)), b], dim=1)

            new_size = merge(size[..., None])
            x, size = merge(x * size[..., None]) / new_size, new_size[..., 0]
            x = x + block.mlp(block.norm2(x))
        expected = model.forward_head(model.norm(x))
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)


def test_r_schedules():
    assert parse_r_schedule(4, 3) == [4, 4, 4]
    assert parse_r_schedule([3, 1], 4) == [3, 1, 0, 0]
    assert parse_r_schedule((8, -1.0), 5) == [16, 12, 8, 4, 0]
    assert parse_r_schedule((8, 1.0), 5) == [0, 4, 8, 12, 16]
    assert parse_r_schedule((8, 0.0), 2) == [8, 8]
    with pytest.raises(ValueError, match="entries"):
        parse_r_schedule([1] * 5, 4)


# ---------------------------------------------------------------- top-k (EViT)
def test_topk_block_matches_reference_fused_token():
    model = effvision.reduce(make_family("vit", seed=8), "topk", keep_rate=0.6, layers=(0,))
    tokens = embed(model, torch.randn(3, 3, 64, 64))
    with torch.no_grad():
        expected_x, _, _, _ = first_block_reference(model, tokens, "topk", keep_rate=0.6)
        state = first_block_effvision(model, tokens)
    torch.testing.assert_close(state.x, expected_x, atol=1e-5, rtol=1e-5)
    assert state.num_tokens == 1 + math.ceil(0.6 * 64) + 1


def test_topk_deit_small_schedule_keep_07():
    info = effvision.reduction_info(effvision.reduce(deit_small(), "topk"))
    assert sorted(set(info["tokens"]), reverse=True) == [197, 140, 100, 72]


# ---------------------------------------------------------------- all methods
METHODS = {"ppt": dict(r=6, layers=(1, 3)), "tome": dict(r=4), "topk": dict(keep_rate=0.7, layers=(1, 3))}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_image_is_independent_of_the_batch(method):
    model = effvision.reduce(make_family("vit", seed=9), method, **METHODS[method])
    images = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_prefix_tokens_survive_in_front(method):
    model = effvision.reduce(make_family("deit_distilled", seed=10), method, track_source=True, **METHODS[method])
    with torch.no_grad():
        state = forward_tokens(model, torch.randn(2, 3, 64, 64))
    assert state.num_tokens < 66
    for token in (0, 1):  # CLS and distillation token hold exactly themselves
        expected = F.one_hot(torch.tensor([token, token]), 66).float()
        torch.testing.assert_close(state.source[:, token], expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_reach_every_trainable_parameter(method):
    model = effvision.reduce(make_family("deit3_layerscale", seed=11), method, **METHODS[method]).train()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(dim=-1).sum()
    loss.backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_autocast_and_train_mode_run(method):
    model = effvision.reduce(make_family("vit", seed=12), method, **METHODS[method])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.15, rtol=0.1)
    model.train()
    assert torch.isfinite(model(images)).all()


def test_grad_checkpointing_keeps_the_reduction():
    model = effvision.reduce(make_family("vit", seed=13), "tome", r=4)
    reference_model = clone_model(model).train()
    model.set_grad_checkpointing(True)
    model.train()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(images), reference_model(images))
