"""timm's model contract on token-reduced ViTs: intermediates, features_only, hooks, pickling, copies,
grad checkpointing."""

import copy
import io
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import effvision
from effvision.tokens.registry import features_only_model
from tests.vit_factory import clone_model, make_family

R = 5  # ToMe r of the tiny 64-patch ViTs (6 blocks: 65 -> 60 -> 55 -> 50 -> 45 -> 40 -> 35 tokens)


# ---------------------------------------------------------------- independent reference of the reduced forward
def reference_tome_forward(model, images):
    """ToMe-reduced forward of a plain timm ViT written out step by step: explicit attention with a log(size)
    key bias, ToMe bipartite matching (A = even positions with the CLS token excluded, B = odd), merge as
    size-weighted means with a summed source map. Returns the token, size and source after every block."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    batch, tokens, _ = x.shape
    size = torch.ones(batch, tokens)
    source = torch.eye(tokens).expand(batch, -1, -1)
    after_blocks = []
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(batch, x.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = (q @ k.transpose(-2, -1) * attn.scale + size.log()[:, None, None, :]).softmax(-1)
        x = x + block.ls1(attn.proj((probs @ v).transpose(1, 2).reshape(batch, x.shape[1], -1)))

        r = min(R, (x.shape[1] - 1) // 2)
        metric = k.mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        scores[:, 0, :] = -torch.inf  # the CLS token (position 0, set A) never merges
        best, best_b = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values

        def merge(t, merged=merged, unmerged=unmerged, best_b=best_b):
            a, b = t[:, ::2], t[:, 1::2]
            channels = t.shape[-1]
            kept = a.gather(1, unmerged[..., None].expand(-1, -1, channels))
            moved = a.gather(1, merged[..., None].expand(-1, -1, channels))
            dst = best_b.gather(1, merged)[..., None].expand(-1, -1, channels)
            return torch.cat([kept, b.scatter_reduce(1, dst, moved, reduce="sum")], dim=1)

        new_size = merge(size[..., None])[..., 0]
        x = merge(x * size[..., None]) / new_size[..., None]
        source = merge(source)
        size = new_size
        x = x + block.ls2(block.mlp(block.norm2(x)))
        after_blocks.append((x, size, source))
    return after_blocks


def tome_vit(seed=0, **kwargs):
    return effvision.reduce(make_family("vit", seed=seed), "tome", r=R, **kwargs)


def test_nlc_intermediates_and_final_features_equal_the_step_by_step_reference():
    model = tome_vit()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = reference_tome_forward(model, images)
        final, intermediates = model.forward_intermediates(images, indices=[1, 3, 5], output_fmt="NLC")
    assert [t.shape[1] for t in intermediates] == [55 - 1, 45 - 1, 35 - 1]
    for taken, index in zip(intermediates, [1, 3, 5], strict=True):
        torch.testing.assert_close(taken, reference[index][0][:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, model.norm(reference[5][0]), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(final, model.forward_features(images))


def test_nchw_maps_have_the_patch_grid_shape_and_each_patch_takes_its_tokens_value():
    model = tome_vit()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = reference_tome_forward(model, images)
        maps = model.forward_intermediates(images, indices=[0, 2, 5], intermediates_only=True)
    for feature_map, index in zip(maps, [0, 2, 5], strict=True):
        assert feature_map.shape == (2, 48, 8, 8)
        tokens, _, source = reference[index]
        for b in range(2):
            for patch in range(64):
                holder = source[b, :, 1 + patch].nonzero().item()  # exactly one token holds each patch
                row, col = divmod(patch, 8)
                torch.testing.assert_close(feature_map[b, :, row, col], tokens[b, holder], atol=1e-5, rtol=1e-5)


def test_pruned_patches_are_zero_and_kept_patches_equal_their_token():
    # threshold 0: no image pools, every reducing block prunes
    model = effvision.reduce(make_family("vit", seed=2), "ppt", r=8, layers=(1, 3), threshold=0.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, states = model.forward_intermediates(images, indices=[3], intermediates_only=True,
                                                   return_token_states=True)
    feature_map, state = maps[0], states[0]
    held = state.source[:, 1:, 1:].sum(dim=1)  # (B, 64): 1 where a patch token holds the patch
    assert set(held.unique().tolist()) == {0.0, 1.0} and (held == 0).sum(dim=1).tolist() == [16, 16]
    flat = feature_map.flatten(2).transpose(1, 2)  # (B, 64, C)
    assert torch.all(flat[held == 0] == 0)
    holder = state.source[:, :, 1:].argmax(dim=1)
    kept = state.x.gather(1, holder[..., None].expand(-1, -1, 48))
    assert torch.equal(flat[held == 1], kept[held == 1])


def test_zero_reduction_intermediates_equal_timm():
    base = make_family("register_tokens", seed=3)
    reduced = effvision.reduce(clone_model(base), "tome", r=0)
    images = torch.randn(2, 3, 64, 64)
    for fmt in ("NCHW", "NLC"):
        with torch.no_grad():
            expected = base.forward_intermediates(images, indices=3, output_fmt=fmt, return_prefix_tokens=True)
            actual = reduced.forward_intermediates(images, indices=3, output_fmt=fmt, return_prefix_tokens=True)
        torch.testing.assert_close(actual[0], expected[0])
        for (a_map, a_prefix), (e_map, e_prefix) in zip(actual[1], expected[1], strict=True):
            torch.testing.assert_close(a_map, e_map)
            torch.testing.assert_close(a_prefix, e_prefix)


def test_stop_early_output_dict_and_sizes_on_request():
    model = tome_vit(seed=4)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(images, indices=[1, 2], output_fmt="NLC", intermediates_only=True)
        early = model.forward_intermediates(images, indices=[1, 2], output_fmt="NLC", stop_early=True,
                                            output_dict=True, return_prefix_tokens=True, return_token_states=True)
    for a, b in zip(full, early["image_intermediates"], strict=True):
        torch.testing.assert_close(a, b)
    assert [p.shape for p in early["image_intermediates_prefix"]] == [(2, 1, 48)] * 2
    sizes = [state.sizes() for state in early["token_states"]]
    assert [s.shape[1] for s in sizes] == [55, 50] and torch.all(sizes[1].sum(dim=1) == 65)


def test_get_intermediate_layers_and_unsupported_masks():
    model = tome_vit(seed=5)
    with torch.no_grad():
        layers = model.get_intermediate_layers(torch.randn(1, 3, 64, 64), n=2, reshape=True)
    assert [t.shape for t in layers] == [(1, 48, 8, 8)] * 2
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 64, 64), attn_mask=torch.ones(1, 65, 65, dtype=torch.bool))


# ---------------------------------------------------------------- features_only
def test_features_only_wraps_the_reduced_model():
    model = tome_vit(seed=6)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(images, indices=(1, 3), intermediates_only=True)
        features = features_only_model(clone_model(model), out_indices=(1, 3))
        actual = features(images)
    assert len(features.model.blocks) == 4  # pruned after the last index, still reducing
    assert type(features.model.blocks).__name__ == "TokenReducingBlocks"
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def test_registered_name_with_features_only():
    features = timm.create_model("ppt_deit_tiny_patch16_224", features_only=True, out_indices=(2, 5, 11))
    assert features.feature_info.channels() == [192] * 3
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 224, 224))
    assert [m.shape for m in maps] == [(1, 192, 14, 14)] * 3


def test_prune_intermediate_layers_keeps_the_reduction():
    model = tome_vit(seed=7)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(images, indices=[2], output_fmt="NLC", intermediates_only=True)
        assert model.prune_intermediate_layers([2]) == [2]
        actual = model.forward_intermediates(images, indices=[2], output_fmt="NLC", intermediates_only=True)
    assert len(model.blocks) == 3
    torch.testing.assert_close(actual[0], expected[0])
    with pytest.raises(ValueError, match="sliced from the first block"):
        model.blocks[1:]


# ---------------------------------------------------------------- hooks
def test_forward_hooks_fire_once_per_block_with_the_blocks_output_tokens():
    model = tome_vit(seed=8)
    images = torch.randn(2, 3, 64, 64)
    seen = []
    handles = [
        block.register_forward_hook(lambda module, args, out, i=i: seen.append((i, args[0].shape[1], out)))
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(images)
        intermediates = model.forward_intermediates(images, indices=6, output_fmt="NLC", intermediates_only=True)
    for handle in handles:
        handle.remove()
    schedule = effvision.reduction_info(model)["tokens"] + [35]
    assert [(i, n_in) for i, n_in, _ in seen] == [(i, schedule[i]) for i in range(6)] * 2
    for (_, _, out), taken in zip(seen[6:], intermediates, strict=True):
        assert torch.equal(out[:, 1:], taken)


def test_hooks_can_replace_input_and_output_and_backward_hooks_run():
    model = tome_vit(seed=9)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.forward_features(images)
    block = model.blocks[5]
    handle = block.register_forward_hook(lambda module, args, out: out * 0)
    with torch.no_grad():
        zeroed = model.forward_features(images)
    handle.remove()
    torch.testing.assert_close(zeroed, model.norm(torch.zeros_like(plain)))
    gradients = []
    handle = block.register_full_backward_hook(lambda module, grad_in, grad_out: gradients.append(grad_out[0]))
    model(images).sum().backward()
    handle.remove()
    assert len(gradients) == 1 and gradients[0].shape == (2, 35, 48)


def test_hooks_on_the_attention_modules_fire_with_their_input_and_output_as_in_timm():
    """timm's block calls ``attn(norm1(x))``; the reduced blocks compute attention from its parts, and used to
    skip hooks on ``attn`` (timm's AttentionExtract(method='hook') style of reading attention)."""
    model = tome_vit(seed=11)
    images = torch.randn(2, 3, 64, 64)
    seen = []
    handles = [block.attn.register_forward_hook(lambda m, args, out, i=i: seen.append((i, args[0], out)))
               for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        plain = model(images)
    schedule = effvision.reduction_info(model)["tokens"]
    assert [(i, x.shape[1], out.shape) for i, x, out in seen] == [(i, n, (2, n, 48)) for i, n in enumerate(schedule)]
    first = model.blocks[0]
    expected_in = first.norm1(model.norm_pre(model._pos_embed(model.patch_embed(images))))
    torch.testing.assert_close(seen[0][1], expected_in)
    for handle in handles:
        handle.remove()
    handle = model.blocks[5].attn.register_forward_hook(lambda m, args, out: out * 0)  # output replaced
    with torch.no_grad():
        changed = model(images)
    handle.remove()
    assert not torch.allclose(changed, plain)


def test_an_attention_module_with_another_forward_is_refused_not_skipped():
    from timm.layers.attention import Attention

    class ZeroAttention(Attention):
        def forward(self, x, attn_mask=None):
            return torch.zeros_like(x)

    model = tome_vit(seed=12)
    old = model.blocks[2].attn
    model.blocks[2].attn = ZeroAttention(48, num_heads=3)
    with pytest.raises(ValueError, match=r"blocks\[2\].attn: ZeroAttention.*another forward would be skipped"):
        model(torch.randn(1, 3, 64, 64))
    model.blocks[2].attn = old
    with pytest.raises(ValueError, match=r"blocks\[0\].attn: DiffAttention"):
        timm.create_model("tome_vit_tiny_patch16_224", attn_layer="diff")


# ---------------------------------------------------------------- pickle, deepcopy, grad checkpointing
def test_torch_save_and_pickle_round_trips_are_exact():
    model = effvision.reduce(make_family("deit_distilled", seed=10), "ppt", r=8, layers=(1, 3), track_source=True)
    images = torch.randn(2, 3, 64, 64)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        expected = model(images)
        for other in (loaded, unpickled):
            assert type(other).__name__ == "TokenReducedVisionTransformerDistilled"
            assert torch.equal(other(images), expected)
            assert other.blocks.track_source and other.blocks.policy == model.blocks.policy


def test_deepcopy_is_exact_and_independent():
    model = tome_vit(seed=11)
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(twin(images), model(images))
    twin.set_grad_checkpointing(True)
    assert twin.blocks.grad_checkpointing and not model.blocks.grad_checkpointing and not model.grad_checkpointing
    with torch.no_grad():
        twin.blocks[0].attn.qkv.weight.add_(1.0)
        assert not torch.equal(twin(images), model(images))
    assert not any(callable(value) for value in vars(model).values() if not isinstance(value, torch.nn.Module))


def test_grad_checkpointing_checkpoints_inside_the_reduction_with_equal_gradients(monkeypatch):
    model = tome_vit(seed=12).train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 4])
    F.cross_entropy(model(images), labels).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    F.cross_entropy(model(images), labels).backward()
    assert len(calls) == 2 * 6  # attention and MLP of each block
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
