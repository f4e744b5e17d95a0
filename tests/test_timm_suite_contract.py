"""What timm's own model tests (timm/tests/test_models.py) ask of a registered model, on the PEFT and reduced
names: ``features_only=True``, torch.fx feature extraction with timm's leaf modules, a head that pools the
tokens itself (CLCA) keeping timm's pre-logits / ``reset_classifier`` semantics, and ``create_model(device=)``
placing every new part. Tiny (vit_tiny, 224 px) models, random weights."""

import warnings

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules

import effvision

NAMES = (
    "ppt_vit_tiny_patch16_224", "tome_vit_tiny_patch16_224", "topk_vit_tiny_patch16_224",
    "sparse_tuning_vit_tiny_patch16_224", "clca_ppt_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224",
)
CLCA = ("clca_ppt_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224")


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["sparse_tuning_vit_tiny_patch16_224", *CLCA])
def test_features_only_on_peft_models(name):
    features = timm.create_model(name, features_only=True, out_indices=(2, 5, 11)).eval()
    assert type(features).__name__ == "FeatureGetterNet"
    assert features.feature_info.channels() == [192] * 3 and features.feature_info.reduction() == [16] * 3
    with torch.no_grad():
        maps = features(images(1))
    assert [m.shape for m in maps] == [(1, 192, 14, 14)] * 3
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("name", NAMES)
def test_torch_fx_feature_extraction_gives_the_models_output(name):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = timm.create_model(name).eval()
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    assert "blocks" in eval_nodes  # the reduction is one opaque node, as timm's own leaf modules are
    extractor = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                         eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)
    x = images()
    with torch.inference_mode():
        expected = model(x)
        (traced,) = extractor(x).values()
    torch.testing.assert_close(traced, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", CLCA)
def test_clca_head_keeps_timms_pre_logits_and_reset_classifier(name):
    model = timm.create_model(name, num_classes=7).eval()
    assert (model.num_features, model.head_hidden_size) == (192, 384)  # aggregation: D -> 2D
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model(x)
    assert features.shape[-1] == model.num_features and pre_logits.shape == (2, model.head_hidden_size)
    assert logits.shape == (2, 7)
    # the classifier is the pointwise conv on the pre-logits
    pointwise = model.head.pointwise
    torch.testing.assert_close(logits, pre_logits @ pointwise.weight[:, :, 0].T + pointwise.bias)

    aggregation = {k: v.clone() for k, v in model.head.state_dict().items() if not k.startswith("pointwise")}
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre_logits)  # no classifier: the model returns its pre-logits
    model.reset_classifier(3)
    assert model.num_classes == 3
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    kept = {k: v for k, v in model.head.state_dict().items() if not k.startswith("pointwise")}
    assert all(torch.equal(kept[k], v) for k, v in aggregation.items())  # the pooling part is kept
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")


@pytest.mark.parametrize("name", CLCA)
def test_reset_classifier_follows_the_models_device_and_dtype(name):
    model = timm.create_model(name, device="meta")
    model.to(dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    for parameter in model.get_classifier().parameters():
        assert (parameter.device.type, parameter.dtype) == ("meta", torch.float64)


@pytest.mark.parametrize("name", ["sparse_tuning_vit_tiny_patch16_224", *CLCA])
def test_create_model_places_every_added_part_on_the_device(name):
    model = timm.create_model(name, device="meta", num_classes=0)
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not misplaced, misplaced[:5]
    if "sparse_tuning" in name:  # still frozen where it was: only adapters and head train
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and not any(n.startswith(("blocks.", "patch_embed.")) for n in trainable)


def test_every_registered_clca_name_has_a_single_class_token_base():
    clca = [name for name in effvision.REGISTERED_MODELS if name.startswith("clca_")]
    assert clca and not any("distilled" in name for name in clca)
    assert "sparse_tuning_deit_tiny_distilled_patch16_224" in effvision.REGISTERED_MODELS  # no CLCA head there
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("clca_ppt_deit_tiny_distilled_patch16_224")


def test_a_model_unpickled_in_a_fresh_process_traces_with_torch_fx(tmp_path):
    import subprocess
    import sys
    import textwrap

    model = timm.create_model("clca_tome_vit_tiny_patch16_224").eval()
    x = images(1)
    with torch.no_grad():
        torch.save({"model": model, "x": x, "y": model(x)}, tmp_path / "model.pt")
    script = textwrap.dedent(f"""
        import torch
        from timm.models import get_notrace_functions, get_notrace_modules
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        saved = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)  # no reduce() in this process
        model = saved["model"]
        tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
        extractor = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                             eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)
        with torch.no_grad():
            (out,) = extractor(saved["x"]).values()
        print("blocks" in eval_nodes, torch.equal(out, saved["y"]))
    """)
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("name", ["sparse_tuning_vit_tiny_patch16_224", *CLCA])
def test_pruned_models_keep_their_taps_and_leave_no_unused_parameter(name):
    import copy

    model = timm.create_model(name).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        whole = copy.deepcopy(model)
        whole.prune_intermediate_layers([11], prune_head=False)
        torch.testing.assert_close(whole(x), expected)  # nothing pruned at the last block
    pruned = copy.deepcopy(model)
    take = pruned.prune_intermediate_layers([4])
    assert len(pruned.blocks) == 5
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0], taps[4])
    pruned.train()
    features = pruned.forward_features(x)
    assert features.shape[:2] == (2, pruned.blocks.token_schedule(197)[-1][1])  # tokens, as a pruned ViT
    features.sum().backward()
    unused = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]


@pytest.mark.parametrize("name", CLCA)
def test_pruning_below_the_clca_head_needs_prune_head(name):
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match="prune_head=True"):
        model.prune_intermediate_layers([4], prune_head=False)


def test_hooks_on_the_blocks_module_fire_once_per_forward_as_on_a_timm_vit():
    model = timm.create_model("tome_vit_tiny_patch16_224").eval()
    seen = []
    model.blocks.register_forward_hook(lambda module, args, output: seen.append((args[0].shape, output.clone())))
    x = images(1)
    with torch.no_grad():
        features = model.forward_features(x)
    assert len(seen) == 1
    tokens_in, tokens_out = seen[0]
    assert tokens_in == (1, 197, 192) and tokens_out.shape[1] < 197  # reduced inside the blocks module
    torch.testing.assert_close(model.norm(tokens_out), features)


@pytest.mark.parametrize(("name", "base"), [
    ("ppt_deit_tiny_patch16_224", "deit_tiny_patch16_224"),
    ("sparse_tuning_vit_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("clca_ppt_vit_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("clca_sparse_tuning_vit_tiny_patch16_224", "vit_tiny_patch16_224"),
    ("tome_vit_base_patch16_224", "vit_base_patch16_224"),
])
def test_pretrained_cfgs_are_the_bases_under_the_registered_name(name, base):
    ours, theirs = timm.get_pretrained_cfg(name), timm.get_pretrained_cfg(base)
    assert ours.architecture == name and ours.tag == theirs.tag  # the base's default tag stays the default
    assert ours.hf_hub_id == theirs.hf_hub_id and ours.mean == theirs.mean and ours.input_size == theirs.input_size
    base_tags = {key.split(".", 1)[1] for key in timm.list_pretrained(f"{base}.*")}
    assert {key.split(".", 1)[1] for key in timm.list_pretrained(f"{name}.*")} == base_tags
    assert timm.is_model_pretrained(name)


def tiny_base_weights(tmp_path, arch: str, seed: int = 0):
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(arch).state_dict().items()}
    path = tmp_path / f"{arch}.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.parametrize("name", ["ppt_deit_tiny_patch16_224", "sparse_tuning_vit_tiny_patch16_224",
                                  "clca_ppt_vit_tiny_patch16_224"])
def test_pretrained_through_timms_script_argument_resolution(name, tmp_path, monkeypatch):
    """timm's validate.py / train.py build a model as ``create_model(**resolve_model_input_args(name, vars(args),
    pretrained=True, ...))``: the resolved cfg of the registered name reaches the entry point as
    ``pretrained_cfg``. It must load the base's hub weights (here a fake hub with local files), as
    ``create_model(name, pretrained=True)`` does; it used to fail with "No pretrained weights exist"."""
    import timm.models._hub as timm_hub
    from timm.models import resolve_model_input_args

    cfg = timm.get_pretrained_cfg(name)
    arch = cfg.hf_hub_id.removeprefix("timm/").split(".")[0]
    path, state = tiny_base_weights(tmp_path, arch)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        assert repo_id == cfg.hf_hub_id and filename.endswith(".safetensors")
        return str(path)

    monkeypatch.setattr(timm_hub, "hf_hub_download", fake_download)
    arguments = resolve_model_input_args(name, {}, pretrained=True, num_classes=5)
    model = timm.create_model(**arguments)
    assert calls and model.num_classes == 5
    assert torch.equal(model.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.equal(model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])
    assert model.pretrained_cfg["mean"] == cfg.mean
    plain = timm.create_model(name, pretrained=True, num_classes=5)  # the usual path, same weights
    assert torch.equal(plain.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])


@pytest.mark.parametrize("name", ["tome_vit_tiny_patch16_224", "sparse_tuning_vit_tiny_patch16_224", *CLCA])
def test_a_model_saved_for_the_hub_comes_back_whole(name, tmp_path):
    """``save_for_hf`` (what ``push_to_hf_hub`` uploads) then ``create_model("local-dir:...", pretrained=True)``
    (``hf-hub:`` takes the same path): the config names the registered architecture, and the checkpoint, which
    holds the adapters and the CLCA head as well as the base's weights, is loaded into the whole model."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # no part left at its initial value
            parameter.add_(0.01 * torch.randn_like(parameter))
    save_for_hf(model, tmp_path / "saved")
    restored = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True).eval()
    assert type(restored) is type(model) and restored.pretrained_cfg["architecture"] == name
    with torch.no_grad():
        assert torch.equal(restored(images()), model(images()))
    features = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True, features_only=True,
                                 out_indices=(2,))
    assert type(features).__name__ == "FeatureGetterNet"


@pytest.mark.parametrize("name", ["sparse_tuning_vit_tiny_patch16_224", *CLCA])
def test_a_saved_model_is_re_headed_for_another_number_of_classes(name, tmp_path):
    """Fine-tuning a saved model on another dataset (timm's train.py ``--pretrained --num-classes N``): the
    checkpoint's classifier is dropped and everything else loads, the CLCA aggregation included. With the
    whole CLCA head named as the classifier, timm kept its classifier keys and the load failed."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    save_for_hf(model, tmp_path / "saved")
    restored = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True, num_classes=3).eval()
    classifier = restored.get_classifier()
    assert classifier.weight.shape[0] == 3 and classifier.bias is not None  # what --head-init-scale/-bias touch
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(restored.pretrained_cfg["classifier"])}
    restored_state = restored.state_dict()
    assert all(torch.equal(restored_state[k], v) for k, v in kept.items())
    assert restored(images()).shape == (2, 3)


def test_the_registered_name_is_the_models_architecture_on_every_path():
    for argument in ("ppt_vit_tiny_patch16_224", "ppt_vit_tiny_patch16_224.augreg_in21k"):
        model = timm.create_model(argument)
        assert model.pretrained_cfg["architecture"] == "ppt_vit_tiny_patch16_224"
        assert model.pretrained_cfg["tag"] == (argument.split(".")[1] if "." in argument else "augreg_in21k_ft_in1k")
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):
        timm.create_model("ppt_vit_tiny_patch16_224.no_such_tag")


def test_timms_scripts_run_with_the_names_registered(tmp_path):
    """``python -m effvision.timm_models SCRIPT.py ARGS``: the script runs as ``__main__`` with its own argv,
    its folder importable (as under ``python SCRIPT.py``), and effvision's names known to timm."""
    import subprocess
    import sys

    (tmp_path / "helper_module.py").write_text("VALUE = 7\n")
    script = tmp_path / "script.py"
    script.write_text("import sys, timm, helper_module\n"
                      "assert __name__ == '__main__'\n"
                      "print(sys.argv[1:], helper_module.VALUE, timm.is_model('clca_ppt_vit_tiny_patch16_224'))\n")
    run = subprocess.run([sys.executable, "-W", "always", "-m", "effvision.timm_models", str(script), "--model", "x"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "['--model', 'x'] 7 True"
    assert "Overwriting" not in run.stderr  # each name registered once (it was twice: timm's import hook re-entered)
    missing = subprocess.run([sys.executable, "-m", "effvision.timm_models", str(tmp_path / "nope.py")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no script" in missing.stderr


@pytest.mark.parametrize("name", ["ppt_vit_tiny_patch16_224", "tome_vit_tiny_patch16_224",
                                  "clca_topk_vit_tiny_patch16_224", "sparse_tuning_vit_tiny_patch16_224"])
def test_set_input_size_gives_the_model_created_at_that_size(name):
    """timm's ``set_input_size``: the reduction's schedule follows the new patch count (the defaults scale with
    it), so the model equals one created with ``img_size=``; it used to keep the 224 px schedule."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    model.set_input_size(img_size=160)
    reference = timm.create_model(name, img_size=160).eval()
    reference.load_state_dict(model.state_dict())
    assert effvision.reduction_info(model)["tokens"] == effvision.reduction_info(reference)["tokens"]
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        scripted = torch.jit.script(model)  # traced at the new size
        torch.testing.assert_close(scripted(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sparse_tuning_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224"])
def test_layer_decay_scales_each_adapter_as_its_block(name):
    """timm's ``--layer-decay`` (param_groups_layer_decay over ``group_matcher``): adapter i learns at block i's
    rate; unmatched, every adapter used to get the head's full rate."""
    from timm.optim import param_groups_layer_decay

    model = timm.create_model(name, freeze=False, num_classes=3)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    for block in (0, 5, 11):
        block_scale = scale[id(named[f"blocks.{block}.attn.qkv.weight"])]
        adapters = [p for n, p in named.items() if n.startswith(f"dense_adapters.adapters.{block}.")]
        assert adapters and all(scale[id(p)] == block_scale for p in adapters)
    assert scale[id(named["blocks.0.attn.qkv.weight"])] < scale[id(named["blocks.11.attn.qkv.weight"])]


@pytest.mark.parametrize(("name", "options", "size"), [
    ("ppt_vit_tiny_patch16_224", {"r": 50}, {"img_size": 64}),
    ("tome_vit_tiny_patch16_224", {"r": [8] * 12}, {"img_size": 32}),
    ("ppt_vit_tiny_patch16_224", {"r": 50}, {"patch_size": 56}),
])
def test_a_size_the_reduction_does_not_fit_is_refused_before_anything_changes(name, options, size):
    """A refused ``set_input_size`` leaves the model as it was (weights, sizes, schedule, outputs); timm's part
    used to run first, leaving a 64 px patch embedding with a 224 px schedule behind the error."""
    model = timm.create_model(name, **options).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = effvision.reduction_info(model)
    x = images(1)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match="too large"):
        model.set_input_size(**size)
    assert model.patch_embed.img_size == (224, 224) and model.patch_embed.patch_size == (16, 16)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert effvision.reduction_info(model) == info
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_set_input_size_with_a_new_patch_size_gives_the_model_created_with_it():
    model = timm.create_model("tome_vit_tiny_patch16_224", r=4).eval()
    model.set_input_size(img_size=128, patch_size=8)
    reference = timm.create_model("tome_vit_tiny_patch16_224", r=4, img_size=128, patch_size=8).eval()
    assert effvision.reduction_info(model)["tokens"] == effvision.reduction_info(reference)["tokens"]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 128, 128)).shape == (1, 1000)


def test_set_input_size_on_a_model_that_does_not_record_its_reduction_is_a_clear_error():
    model = timm.create_model("ppt_vit_tiny_patch16_224")
    model.blocks.reduction = None  # as on a reduced model pickled by an older effvision
    with pytest.raises(ValueError, match="create it again with img_size"):
        model.set_input_size(img_size=160)


def test_a_model_pickled_with_the_old_size_check_hook_loads_and_still_checks(tmp_path):
    """Older versions checked the input size in a forward pre-hook on ``patch_embed``; their pickles name it."""
    from effvision.tokens.reduce import _check_size_hook

    model = timm.create_model("ppt_vit_tiny_patch16_224").eval()
    model.patch_embed.register_forward_pre_hook(_check_size_hook)
    torch.save(model, tmp_path / "old.pt")
    loaded = torch.load(tmp_path / "old.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), model(images()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects 224x224 images"):
        loaded(torch.randn(1, 3, 160, 160))
    with pytest.raises(ValueError, match="expected 3-channel images"):
        loaded.patch_embed(torch.randn(1, 1, 224, 224))  # the hook itself, on the sub-module alone


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_gives_empty_outputs_as_timm_does(name):
    """A (0, 3, H, W) batch (e.g. the last, empty shard of a distributed eval) gives (0, classes) logits, like
    timm's own ViT, in eval and in training mode, and an empty gradient pass; no torch warning either."""
    model = timm.create_model(name)
    empty = torch.zeros(0, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            assert model.eval()(empty).shape == (0, 1000)
            final, intermediates = model.forward_intermediates(empty, indices=2)
            assert final.shape[0] == 0 and [t.shape[0] for t in intermediates] == [0, 0]
        logits = model.train()(empty)
    assert logits.shape == (0, 1000)
    logits.sum().backward()


@pytest.mark.parametrize("name", ["ppt_vit_tiny_patch16_224", "tome_vit_tiny_patch16_224"])
@pytest.mark.parametrize("side", [160, 256])
def test_dynamic_img_size_maps_have_the_grid_of_the_image_given(name, side):
    """With ``dynamic_img_size=True`` the NCHW maps (features_only, forward_intermediates) follow the image's
    patch grid, as timm's: they used the 224 px grid, silently wrong at 256 px and a reshape error at 160.
    With nothing removed (r=0) they equal the plain timm model's maps."""
    torch.manual_seed(0)
    reduced = timm.create_model(name, dynamic_img_size=True, r=0).eval()
    plain = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
    plain.load_state_dict(reduced.state_dict())
    x = images(1)[:, :, :side, :side] if side <= 224 else torch.randn(1, 3, side, side)
    with torch.no_grad():
        _, maps = reduced.forward_intermediates(x, indices=[5, 11])
        _, expected = plain.forward_intermediates(x, indices=[5, 11])
        features = timm.create_model(name, dynamic_img_size=True, features_only=True, out_indices=(-1,)).eval()(x)
    assert [m.shape for m in maps] == [(1, 192, side // 16, side // 16)] * 2 == [m.shape for m in expected]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert features[0].shape == (1, 192, side // 16, side // 16)


@pytest.mark.parametrize("name", ["ppt_vit_tiny_patch16_224", "tome_vit_tiny_patch16_224"])
def test_attention_extract_by_hooks_gives_each_blocks_reduced_attention(name):
    """timm's ``AttentionExtract(method="hook")`` reads ``attn_drop``'s input: the attention probabilities, which
    a timm ViT computes only with fused attention off. Reduced blocks pass theirs through the same module, on the
    tokens each block has. (``method="fx"`` cannot see inside the reduction: it is one fx leaf.)"""
    from timm.utils import AttentionExtract

    model = timm.create_model(name).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        maps = AttentionExtract(model, method="hook")(images())
    assert list(maps) == [f"blocks.{i}.attn.attn_drop" for i in range(12)]
    tokens = [m.shape[-1] for m in maps.values()]
    assert tokens[0] == 197 and tokens[-1] < 197 and tokens == sorted(tokens, reverse=True)
    for attention in maps.values():
        assert attention.shape[:2] == (2, 3) and attention.shape[-2] == attention.shape[-1]
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))


@pytest.mark.parametrize("name", ["ppt_deit_tiny_patch16_224", "sparse_tuning_vit_tiny_patch16_224",
                                  "clca_ppt_vit_tiny_patch16_224"])
def test_a_weights_file_loads_at_another_image_size_as_into_the_base(name, tmp_path):
    """timm's train.py ``--pretrained --pretrained-path F --img-size 64`` (the file folded into the resolved cfg
    by ``resolve_model_input_args``): the position embedding is resampled to the model's grid, as the base
    model's own builder does. It failed with a ``pos_embed`` size mismatch on every registered name."""
    from timm.models import resolve_model_input_args

    arch = timm.get_pretrained_cfg(name).hf_hub_id.removeprefix("timm/").split(".")[0]
    path, state = tiny_base_weights(tmp_path, arch)
    overlay = dict(file=str(path), num_classes=-1)
    model = timm.create_model(**resolve_model_input_args(name, {"img_size": 64}, pretrained=True, num_classes=3,
                                                         pretrained_cfg_overlay=overlay))
    base = timm.create_model(**resolve_model_input_args(arch, {"img_size": 64}, pretrained=True, num_classes=3,
                                                        pretrained_cfg_overlay=overlay))
    assert model.pos_embed.shape == base.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(model.pos_embed, base.pos_embed)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])


@pytest.mark.parametrize("name", ["tome_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224"])
def test_a_model_saved_for_the_hub_loads_at_another_image_size(name, tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    save_for_hf(model, tmp_path / "saved")
    restored = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True, img_size=96).eval()
    assert restored.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(restored.head.pointwise.weight if "clca" in name else restored.head.weight,
                       model.head.pointwise.weight if "clca" in name else model.head.weight)
    with torch.no_grad():
        assert restored(torch.randn(1, 3, 96, 96)).shape == (1, 5)


def test_clca_carrier_tokens_are_input_tokens_for_layer_decay_and_weight_decay():
    """timm's optimizer factory treats CLCA's carrier tokens and their position embedding like ``cls_token`` /
    ``pos_embed``: the stem's layer-wise rate and no weight decay (they got the head's full rate and decay)."""
    from timm.optim import create_optimizer_v2

    model = timm.create_model("clca_topk_vit_tiny_patch16_224", img_size=64, carriers=2, num_classes=3)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    stem = group_of[id(named["pos_embed"])]
    for name in ("clca_cache.carrier_tokens", "clca_cache.carrier_pos_embed"):
        group = group_of[id(named[name])]
        assert (group["lr_scale"], group["weight_decay"]) == (stem["lr_scale"], 0.0)
    assert stem["lr_scale"] < 0.01
    assert {"clca_cache.carrier_tokens", "clca_cache.carrier_pos_embed", "pos_embed"} <= model.no_weight_decay()
    plain = timm.create_model("clca_topk_vit_tiny_patch16_224", img_size=64, num_classes=3)  # no carriers
    assert not any(name.startswith("clca_cache") for name in plain.no_weight_decay())


def test_clca_prefix_tokens_of_intermediates_are_the_models_prefix_tokens():
    """``return_prefix_tokens`` gives (B, num_prefix_tokens, C) after every block, as timm's; CLCA's re-injected
    cache tokens came back as prefix tokens, (B, 12, C) after block 11, when they were protected prefix tokens.
    They are stream tokens now (as released), so they come with the patch tokens."""
    model = timm.create_model("clca_topk_vit_tiny_patch16_224", img_size=64, num_classes=3).eval()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(2, 3, 64, 64), indices=[1, 5, 11], return_prefix_tokens=True,
                                          output_fmt="NLC", intermediates_only=True, return_token_states=True)
    taken, states = out
    for (patches, prefix), state in zip(taken, states, strict=True):
        assert prefix.shape == (2, model.num_prefix_tokens, model.embed_dim)
        assert torch.equal(prefix, state.x[:, :model.num_prefix_tokens])
        assert patches.shape[1] == state.num_tokens - state.num_prefix
    plain = timm.create_model("topk_vit_tiny_patch16_224", img_size=64, num_classes=3)
    assert states[-1].num_prefix == model.num_prefix_tokens
    assert states[-1].num_tokens > effvision.reduction_info(plain)["tokens_after"][-1]  # the cache tokens are there


@pytest.mark.parametrize("name", ["sparse_tuning_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224",
                                  "clca_topk_vit_tiny_patch16_224"])
def test_a_checkpoint_of_the_whole_model_loads_through_the_overlay_file(name, tmp_path):
    """timm's train.py ``--pretrained-path`` with a checkpoint of the registered model itself (adapters, the CLCA
    head): it went to the base ViT and failed strictly ("Unexpected key(s) ... dense_adapters"), although
    plain timm models and ppt/tome/topk load their own checkpoints this way. Also at another image size."""
    torch.manual_seed(0)
    trained = timm.create_model(name, num_classes=3, img_size=64)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # adapters and head are no longer their init
    path = tmp_path / "whole.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    loaded = timm.create_model(name, pretrained=True, num_classes=3, img_size=64,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    expected = trained.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    resized = timm.create_model(name, pretrained=True, num_classes=3, img_size=96,
                                pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    assert resized.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(resized.blocks[2].mlp.fc2.weight, trained.blocks[2].mlp.fc2.weight)


def test_a_crafted_overlay_file_is_checked_before_timm_reads_it(tmp_path):
    """The overlay file of a registered name is read by timm's loader; it is checked first as every checkpoint a
    user passes (here a pickle nested 300,000 deep, which segfaulted torch's weights-only unpickler)."""
    import zipfile

    from effvision.errors import UserError

    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        out.writestr("archive/data.pkl", b"\x80\x02}K\x01" + b"\x85" * 300_000 + b"K\x01s.")
    with pytest.raises(UserError, match="nests values more than 100 deep"):
        timm.create_model("sparse_tuning_vit_tiny_patch16_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
