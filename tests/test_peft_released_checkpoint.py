"""Loading released Sparse-Tuning / CLCA checkpoints (structure-matched, weights_only) from local files."""

import argparse
import random
import signal

import pytest
import torch

import effvision
from effvision.peft import add_clca, sparse_tuning
from effvision.peft.released_checkpoint import load_released_checkpoint
from tests.vit_factory import make_family

# names a release might use: ours never appear, so every adapter / head tensor is matched by structure
ADAPTER_NAMES = {"down1": "fc_in", "down2": "fc_mid", "up1": "fc_mid_up", "down3": "fc_cat", "up2": "fc_out"}
# the released CLCA's ``ifa_head``: Sequential(Sequential(BN, depthwise conv, BN, GELU, pointwise conv), Rearrange)
HEAD_NAMES = {
    "norm_in": "ifa_head.0.0",
    "depthwise": "ifa_head.0.1",
    "norm_mid": "ifa_head.0.2",
    "pointwise": "ifa_head.0.4",
}


def images(batch=2):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def tuned(seed):
    model = sparse_tuning(make_family("vit", seed=seed, depth=4), bottleneck=16, inner=8, keep_rate=0.7, layers=(1, 2))
    with torch.no_grad():
        for param in [*model.dense_adapters.parameters(), *model.head.parameters()]:
            param.normal_(0, 0.1)
    return model.eval()


def released_sparse_tuning_file(model, path, shuffle_seed=0, drop=(), extra=None):
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("dense_adapters.adapters."):
            _, _, block, layer, suffix = name.split(".")
            name = f"blocks.{block}.adapter.{ADAPTER_NAMES[layer]}.{suffix}"
        if name not in drop:
            state[name] = value.clone()
    state.update(extra or {})
    items = list(state.items())
    random.Random(shuffle_seed).shuffle(items)
    torch.save({"model": dict(items), "epoch": 99}, path)
    return path


def test_sparse_tuning_checkpoint_loads_by_structure(tmp_path):
    source = tuned(seed=0)
    path = released_sparse_tuning_file(source, tmp_path / "st.pth")
    target = tuned(seed=5)
    report = load_released_checkpoint(target, path)
    assert len(report["by_structure"]) == 4 * 5 * 2  # 4 adapters x 5 layers x (weight, bias)
    assert report["by_structure"]["dense_adapters.adapters.2.down3.weight"] == "blocks.2.adapter.fc_cat.weight"
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    with torch.no_grad():
        torch.testing.assert_close(target(images()), source(images()), atol=0, rtol=0)


def test_clca_checkpoint_with_carriers_loads_by_structure(tmp_path):
    def build(seed):
        model = add_clca(effvision.reduce(make_family("vit", seed=seed, depth=4), "topk", layers=(1, 2)), carriers=2)
        with torch.no_grad():
            for param in [*model.head.parameters(), *model.clca_cache.parameters()]:
                param.normal_(0, 0.1)
            model.head.norm_mid.running_var.uniform_(0.5, 1.5)
        return model.eval()

    source = build(0)
    state = {}
    for name, value in source.state_dict().items():
        for ours, theirs in HEAD_NAMES.items():
            name = name.replace(f"head.{ours}.", f"{theirs}.")
        state[name.replace("clca_cache.carrier_tokens", "clr")] = value.clone()
    # the release's layout: the carriers' position embedding is the last rows of pos_embed (its add_clr), and
    # the linear classifier it was built with stays in the file, unused beside ifa_head
    state["pos_embed"] = torch.cat([state["pos_embed"], state.pop("clca_cache.carrier_pos_embed")], dim=1)
    state["head.weight"], state["head.bias"] = torch.randn(1000, 48), torch.randn(1000)
    torch.save(state, tmp_path / "clca.pth")
    target = build(3)
    report = load_released_checkpoint(target, tmp_path / "clca.pth")
    assert report["by_structure"]["clca_cache.carrier_pos_embed"] == "pos_embed[65:]"
    assert report["by_structure"]["clca_cache.carrier_tokens"] == "clr"
    assert report["by_structure"]["head.norm_mid.running_var"] == "ifa_head.0.2.running_var"
    assert report["ignored"] == ["head.weight", "head.bias"]
    with torch.no_grad():
        torch.testing.assert_close(target(images()), source(images()), atol=0, rtol=0)


def test_wrong_width_is_a_clear_error(tmp_path):
    path = released_sparse_tuning_file(tuned(seed=0), tmp_path / "st.pth")
    other = sparse_tuning(make_family("vit", depth=4), bottleneck=8, keep_rate=0.7, layers=(1, 2))
    with pytest.raises(ValueError, match="does not fit this model") as error:
        load_released_checkpoint(other, path)
    assert "blocks.0.adapter.fc_in.weight: shape (16, 48) matches no part" in str(error.value)
    assert "missing from the file: dense_adapters.adapters.0.down1.weight" in str(error.value)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    path = released_sparse_tuning_file(
        tuned(seed=0),
        tmp_path / "st.pth",
        drop=("blocks.3.adapter.fc_out.bias",),
        extra={"prompt_tokens": torch.zeros(1, 5, 48)},
    )
    with pytest.raises(ValueError) as error:
        load_released_checkpoint(tuned(seed=1), path)
    message = str(error.value)
    assert "missing from the file: dense_adapters.adapters.3.up2.bias" in message
    assert "prompt_tokens: shape (1, 5, 48) matches no part" in message


class TrainingCallback:
    """A class of the training script's own: unpickling it would import and run that script's code."""


def test_files_that_need_code_to_load_are_refused(tmp_path):
    """An ``argparse.Namespace`` of settings is read through a stand-in (the release saves one); a class of the
    training script is refused, by name."""
    state = tuned(seed=0).state_dict()
    torch.save({"model": state, "callback": TrainingCallback()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="TrainingCallback, which effvision's checkpoint allow list does not"):
        load_released_checkpoint(tuned(seed=0), tmp_path / "pickled.pth")


def test_the_dense_reading_has_no_released_layout(tmp_path):
    path = released_sparse_tuning_file(tuned(seed=0), tmp_path / "st.pth")
    dense = sparse_tuning(make_family("vit", depth=4), adapter="dense", keep_rate=0.7, layers=(1, 2))
    with pytest.raises(ValueError, match="adapter='released'"):
        load_released_checkpoint(dense, path)


def _self_containing() -> dict:
    payload: dict = {}
    payload["model"] = payload
    return payload


@pytest.mark.parametrize("payload,message", [
    (_self_containing(), "changes a value after sharing it"),  # before: an endless loop unwrapping {"model": ...}
    ({"model": {1: torch.zeros(1)}}, "maps 1 to a Tensor"),
    ({"state_dict": {"blocks.0.adapter.fc_in.weight": [1.0]}}, "to a list, not a name to a tensor"),
    ([torch.zeros(1)], "holds no state dict"),
    ({"model": {"blocks.0.adapter.fc_in.weight": torch.zeros(1).expand(30000, 30000)}}, "file stores only 4 bytes"),
])
def test_crafted_containers_are_clear_errors_at_once(tmp_path, payload, message):
    torch.save(payload, tmp_path / "crafted.pth")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("still unwrapping after 20 s"))
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match=message):
            load_released_checkpoint(tuned(seed=0), tmp_path / "crafted.pth")
    finally:
        signal.alarm(0)


def test_a_fifo_is_an_error_not_a_hang(tmp_path):
    import os

    os.mkfifo(tmp_path / "released.pth")  # torch.load would wait for a writer forever
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("still waiting on the FIFO after 20 s"))
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            load_released_checkpoint(tuned(seed=0), tmp_path / "released.pth")
    finally:
        signal.alarm(0)


def test_a_checkpoint_as_the_sparse_tuning_release_saves_it_loads_with_its_head_norm_folded(tmp_path):
    """The release's save_model writes {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace};
    adapters as blocks.{i}.adaptmlp.*, the classifier as head = Sequential(BatchNorm1d(affine=False,
    eps=1e-6), Linear). The Namespace made weights_only refuse the file and head.0/head.1 matched nothing."""
    source = tuned(seed=0)
    dim, classes = source.embed_dim, source.num_classes
    generator = torch.Generator().manual_seed(3)
    mean, var = torch.randn(dim, generator=generator), torch.rand(dim, generator=generator) + 0.5
    weight, bias = torch.randn(classes, dim, generator=generator), torch.randn(classes, generator=generator)
    state = {}
    for name, value in source.state_dict().items():
        if name.startswith("dense_adapters.adapters."):
            _, _, block, layer, suffix = name.split(".")
            name = f"blocks.{block}.adaptmlp.{layer}.{suffix}"
        if not name.startswith("head."):
            state[name] = value.clone()
    state.update({"head.0.running_mean": mean, "head.0.running_var": var,
                  "head.0.num_batches_tracked": torch.tensor(7), "head.1.weight": weight, "head.1.bias": bias})
    args = argparse.Namespace(model="vit_base_patch16", lr=1e-3, fuse_token=True)
    torch.save({"model": state, "optimizer": {}, "epoch": 30, "scaler": {}, "args": args}, tmp_path / "st.pth")

    target = tuned(seed=5)
    report = load_released_checkpoint(target, tmp_path / "st.pth")
    assert report["folded"] and report["by_structure"]["dense_adapters.adapters.1.up2.weight"] == \
        "blocks.1.adaptmlp.up2.weight"
    with torch.no_grad():
        features = source.forward_head(source.forward_features(images()), pre_logits=True)
        expected = ((features - mean) / (var + 1e-6).sqrt()) @ weight.T + bias
        torch.testing.assert_close(target(images()), expected, atol=1e-5, rtol=1e-5)
