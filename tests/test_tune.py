"""``effvision tune``: target parsing, the search and pick with a deterministic timer, configs, the CLI."""

import json

import pytest
import timm
import torch

import effvision
from effvision import tune
from effvision.cli import main
from effvision.errors import UserError
from tests.vit_factory import make_family

FIXED_SHARE = 0.2  # the fake device: time = 0.2 + 0.8 * MACs ratio (x 10 ms)


class MacsTimer:
    """A deterministic device: a batch takes 10 ms x (FIXED_SHARE + (1 - FIXED_SHARE) x MACs ratio)."""

    def __init__(self):
        self.prepared = 0

    def prepare(self, model):
        self.prepared += 1
        seconds = 0.01 * (FIXED_SHARE + (1 - FIXED_SHARE) * effvision.reduction_info(model)["macs_ratio"])
        return lambda: seconds


def fake_speedup(macs_ratio):
    return 1 / (FIXED_SHARE + (1 - FIXED_SHARE) * macs_ratio)


@pytest.fixture(scope="module")
def tiny_vit():
    return make_family("vit")


@pytest.fixture(scope="module")
def images():
    return torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def result(tiny_vit, images):
    return tune.tune(tiny_vit, "1.5x", images, MacsTimer(), batch_size=6, base_model="tiny")


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("1.8x", "speedup", 1.8), ("2X", "speedup", 2.0), ("120ms", "latency", 0.12), ("0.5 s", "latency", 0.5)],
)
def test_target_parses_speedups_and_latencies(text, kind, value):
    target = tune.Target.parse(text)
    assert (target.kind, target.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["fast", "1.8", "0x", "-2x", "12 fps", "0.5x", "1x"])
def test_target_rejects_other_text(text):
    with pytest.raises(ValueError, match="target"):
        tune.Target.parse(text)


def test_latency_target_asks_for_the_speedup_that_reaches_it():
    assert tune.Target.parse("50ms").required_speedup(base_seconds=0.1) == pytest.approx(2.0)


@pytest.mark.parametrize("method", tune.METHODS)
def test_grid_starts_unreduced_and_orders_distinct_schedules_by_macs(tiny_vit, method):
    grid = tune.candidate_grid(tiny_vit, method)
    ratios = [candidate.macs_ratio for candidate in grid]
    assert ratios[0] == pytest.approx(1.0)
    assert ratios == sorted(ratios, reverse=True)
    assert len(grid) > 10
    for candidate in (grid[1], grid[-1]):
        reduced = effvision.reduce(make_family("vit"), method, **candidate.options)
        assert effvision.reduction_info(reduced)["macs_ratio"] == pytest.approx(candidate.macs_ratio)


def test_ppt_grid_moves_its_blocks_earlier_only_beyond_what_the_default_blocks_reach(tiny_vit):
    grid = tune.candidate_grid(tiny_vit, "ppt")
    default = [c for c in grid if c.options["layers"] == (1, 3, 4)]
    earlier = [c for c in grid if c.options["layers"] != (1, 3, 4)]
    assert earlier and {c.options["layers"] for c in earlier} <= {(0, 2, 3), (0, 1, 2)}
    assert max(c.macs_ratio for c in earlier) < min(c.macs_ratio for c in default)


def test_grid_of_a_method_that_needs_a_class_token_is_a_clear_error():
    with pytest.raises(ValueError, match="does not apply"):
        tune.candidate_grid(make_family("no_class_token"), "ppt")


def test_fidelity_of_identical_logits_is_full_agreement_and_zero_kl():
    logits = torch.randn(5, 7)
    assert tune.fidelity(logits, logits.clone()) == (1.0, pytest.approx(0.0, abs=1e-6))


def test_fidelity_matches_the_definitions():
    reference = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    reduced = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    p, q = reference.softmax(-1), reduced.softmax(-1)
    expected_kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    agreement, kl = tune.fidelity(reference, reduced)
    assert agreement == 0.5
    assert kl == pytest.approx(expected_kl)


def _timed(macs_ratio, speedup, agreement, kl, name="x"):
    candidate = tune.Candidate("tome", {"r": name}, macs_ratio, 1.0, 10, top1_agreement=agreement, kl=kl)
    candidate.base_times, candidate.times = [1.0], [1.0 / speedup]
    return candidate


def test_pick_prefers_clearly_higher_agreement_even_with_more_reduction():
    slow_but_faithful = _timed(0.8, 1.4, 1.0, 0.0, "slow")
    less_faithful = _timed(0.6, 1.6, 0.80, 0.01, "less-faithful")
    faithful = _timed(0.4, 2.0, 0.95, 0.03, "faithful")
    untimed = tune.Candidate("tome", {"r": "untimed"}, 0.7, 1.0, 10, top1_agreement=1.0, kl=0.0)
    candidates = [slow_but_faithful, less_faithful, faithful, untimed]
    assert tune.pick_setting(candidates, tune.Target.parse("1.5x"), samples=100) is faithful


def test_pick_treats_agreements_within_the_calibration_noise_as_equal_and_takes_the_least_reduction():
    # one standard error at 0.95 on 100 images is 0.022: 0.94 and 0.95 are not told apart
    less_reduced = _timed(0.6, 1.6, 0.94, 0.05, "less-reduced")
    more_reduced = _timed(0.4, 2.0, 0.95, 0.01, "more-reduced")
    assert tune.pick_setting([more_reduced, less_reduced], tune.Target.parse("1.5x"), samples=100) is less_reduced
    assert tune.pick_setting([more_reduced, less_reduced], tune.Target.parse("1.5x"), samples=10_000) is more_reduced


def test_no_pick_when_no_timed_setting_meets_the_target():
    assert tune.pick_setting([_timed(0.5, 1.8, 1.0, 0.0)], tune.Target.parse("3x"), samples=32) is None


def test_agreement_margin_is_one_binomial_standard_error_at_least_one_image():
    assert tune.agreement_margin(0.5, 100) == pytest.approx(0.05)
    assert tune.agreement_margin(1.0, 32) == pytest.approx(1 / 32)


def test_speedup_is_the_median_of_paired_rounds():
    candidate = tune.Candidate("tome", {"r": 1}, 0.5, 1.0, 10)
    candidate.base_times = [1.0, 4.0, 1.0]  # a load spike in round 2 hits both models of that round
    candidate.times = [0.5, 2.0, 0.4]
    assert candidate.speedup == pytest.approx(2.0)


def test_every_pick_meets_the_target_near_the_boundary(result, tiny_vit):
    assert set(result.picks) == set(tune.METHODS)
    for method, pick in result.picks.items():
        assert pick is not None, method
        assert pick.speedup >= 1.5
        assert pick.final_speedup == pytest.approx(fake_speedup(pick.macs_ratio))
        grid = tune.candidate_grid(tiny_vit, method)
        index = next(i for i, c in enumerate(grid) if c.options["r" if method != "topk" else "keep_rate"]
                     == pick.options["r" if method != "topk" else "keep_rate"])
        # the search stops within 5% of the target, or at the boundary of the grid
        assert pick.speedup <= 1.5 * 1.05 or fake_speedup(grid[index - 1].macs_ratio) < 1.5


def test_pick_has_the_highest_fidelity_of_the_timed_settings_meeting_the_target(result, images):
    for method, pick in result.picks.items():
        rivals = [c for c in result.candidates if c.method == method and c.speedup and c.speedup >= 1.5]
        assert pick in rivals
        margin = tune.agreement_margin(pick.top1_agreement, len(images))
        assert all(c.top1_agreement <= pick.top1_agreement + margin for c in rivals)
    assert result.best in result.picks.values()


def test_search_times_few_settings(result):
    assert len([c for c in result.candidates if c.timed_as is None]) <= 3 * 6


def test_ppt_thresholds_share_the_timing_of_the_picked_r(result):
    variants = [c for c in result.candidates if c.timed_as is not None]
    assert sorted(c.options["threshold"] for c in variants) == sorted(tune.PPT_THRESHOLDS[1:])
    assert all(c.speedup == c.timed_as.speedup and c.options["r"] == c.timed_as.options["r"] for c in variants)


def test_unreachable_target_leaves_every_method_without_a_pick(tiny_vit, images):
    result = tune.tune(tiny_vit, "20x", images, MacsTimer(), methods=("tome",), batch_size=6, max_steps=3)
    assert result.picks == {"tome": None} and result.best is None
    assert "target not met (fastest timed:" in result.table()
    with pytest.raises(ValueError, match="no method met the target 20x"):
        result.config()


def test_latency_target_is_met_in_seconds_per_batch(tiny_vit, images):
    result = tune.tune(tiny_vit, "7ms", images, MacsTimer(), methods=("topk",), batch_size=6)
    pick = result.picks["topk"]
    assert pick.seconds <= 0.007
    assert result.base_seconds == pytest.approx(0.01)


def test_config_and_plot(result, tmp_path):
    pytest.importorskip("matplotlib")
    config = json.loads(json.dumps(result.config()))
    assert config["format"] == tune.CONFIG_FORMAT
    assert config["method"] == result.best.method and config["model"] is None  # "tiny" is not a timm name
    assert set(config["per_method"]) == set(tune.METHODS)
    rebuilt = effvision.reduce(make_family("vit"), config["method"], **config["options"])
    assert effvision.reduction_info(rebuilt)["macs_ratio"] == pytest.approx(result.best.macs_ratio)
    path = result.plot(tmp_path / "tune.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_builtin_calibration_images_are_normalised_crops():
    data_config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 0.9}
    images, description = tune.calibration_images(data_config, count=6)
    assert images.shape == (6, 3, 32, 32)
    assert images.min() >= -2.0 and images.max() <= 2.0
    assert not torch.equal(images[0], images[1])
    assert "built-in photos" in description


def test_calibration_images_from_a_folder(tmp_path):
    from PIL import Image

    for index, size in enumerate([(40, 30), (30, 50)]):
        Image.new("RGB", size, (index * 100, 50, 200)).save(tmp_path / f"{index}.png")
    data_config = {"input_size": (3, 16, 16), "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0}
    images, description = tune.calibration_images(data_config, count=8, folder=tmp_path)
    assert images.shape == (2, 3, 16, 16)
    # the memory bound counts the images the folder has, not the count asked for
    assert tune.calibration_images(data_config, count=10**12, folder=tmp_path)[0].shape == (2, 3, 16, 16)
    assert images[1, 0].allclose(torch.tensor(100 / 255))
    assert str(tmp_path) in description


def test_cli_writes_a_config_that_timm_create_model_accepts(tmp_path, capsys):
    output = tmp_path / "tune.json"
    # a latency every setting meets: the test must not depend on how busy the machine is
    argv = ["tune", "deit_tiny_patch16_224", "--target", "100s", "--batch-size", "2", "--calibration-count", "2",
            "--methods", "tome", "topk", "--repeats", "1", "--final-repeats", "1", "--max-steps", "2",
            "-o", str(output)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "re-measured" in out and "top-1 agree" in out
    config = json.loads(output.read_text())
    assert output.with_suffix(".png").is_file() or "plot skipped" in capsys.readouterr().err
    model = timm.create_model(config["model"], **config["kwargs"])
    assert config["model"] == f"{config['method']}_deit_tiny_patch16_224"
    assert effvision.reduction_info(model)["macs_ratio"] == pytest.approx(config["measured"]["macs_ratio"], abs=1e-4)
    assert effvision.reduction_info(tune.model_from_config(output))["macs_ratio"] == pytest.approx(
        config["measured"]["macs_ratio"], abs=1e-4
    )


def test_cli_user_errors(tmp_path, capsys):
    assert main(["tune", "deit_tiny_patch16_224", "--target", "fast"]) == 1
    assert main(["tune", "no_such_model", "--target", "2x", "-o", str(tmp_path / "a.json")]) == 1
    err = capsys.readouterr().err
    assert "speed-up like '1.8x'" in err and "unknown timm model" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option", ["--batch-size", "--repeats", "--final-repeats"])
def test_cli_an_explicit_zero_is_an_error_not_the_default(tmp_path, capsys, option):
    assert main(["tune", "deit_tiny_patch16_224", "--target", "2x", option, "0", "-o", str(tmp_path / "a.json")]) == 1
    assert "must be >= 1" in capsys.readouterr().err and not (tmp_path / "a.json").exists()


def test_cli_pretrained_without_network_is_a_clear_error(monkeypatch, tmp_path, capsys):
    real_create_model = timm.create_model

    def offline_create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
        return real_create_model(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    argv = ["tune", "deit_tiny_patch16_224", "--target", "2x", "--pretrained", "-o", str(tmp_path / "a.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "could not get the pretrained weights of deit_tiny_patch16_224" in err and "--checkpoint" in err
    assert "timm/deit_tiny_patch16_224.fb_in1k" in err and "HF_HUB_OFFLINE=1" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tune_on_cuda_in_bf16(tiny_vit, images):
    model = make_family("vit").cuda()
    timer = tune.TorchTimer((3, 64, 64), batch_size=64, device="cuda", dtype=torch.bfloat16, warmup=3)
    result = tune.tune(model, "1.2x", images, timer, device="cuda", dtype=torch.bfloat16, batch_size=64,
                       methods=("tome",), repeats=5, final_repeats=5)
    assert result.table()
    assert result.candidates and all(c.top1_agreement is not None for c in result.candidates)


def test_pooled_speedup_takes_search_and_remeasured_rounds_together():
    candidate = _timed(0.5, 2.0, 1.0, 0.0)
    candidate.final_base_times, candidate.final_times = [1.0, 1.0], [1 / 1.5, 1 / 1.6]
    assert candidate.pooled_speedup == pytest.approx(1.6)
    assert tune.Target.parse("1.8x").met_by(candidate) and not tune.Target.parse("1.8x").met_by(candidate, pooled=True)


def test_a_pick_that_falls_short_when_remeasured_is_not_the_best(tiny_vit, images):
    class SlowerPPTWhenRemeasured(MacsTimer):
        remeasuring = False

        def prepare(self, model):
            run = super().prepare(model)
            if self.remeasuring and effvision.reduction_info(model)["method"] == "ppt":
                return lambda: 3 * run()
            return run

    timer = SlowerPPTWhenRemeasured()

    def log(message):
        timer.remeasuring = timer.remeasuring or message.startswith("re-measuring")

    result = tune.tune(tiny_vit, "1.5x", images, timer, methods=("ppt", "tome"), batch_size=6, log=log)
    assert result.picks["ppt"] is not None and not result.target.met_by(result.picks["ppt"], pooled=True)
    assert result.best is result.picks["tome"]
    assert "ppt fell short of the target" in result.table()


def test_onnx_timer_times_an_exported_reduced_model(tmp_path):
    pytest.importorskip("onnxruntime")
    model = effvision.reduce(make_family("vit"), "tome", r=4)
    timer = tune.OnnxTimer((3, 64, 64), batch_size=3, workdir=tmp_path, threads=1)
    run_once = timer.prepare(model)
    assert run_once() > 0
    assert list(tmp_path.glob("candidate-*.onnx"))


def test_a_calibration_set_larger_than_memory_allows_is_refused_before_it_is_made(tmp_path, capsys):
    # before: 10^8 images were cropped one by one towards 56 TB of float32
    argv = ["tune", "deit_tiny_patch16_224", "--target", "2x", "--calibration-count", "100000000",
            "-o", str(tmp_path / "a.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "100000000 calibration images of 224x224 (about" in err and "would take 56076.0 GiB" in err
    assert not (tmp_path / "a.json").exists()


def test_a_timed_batch_larger_than_memory_allows_is_refused_before_it_is_made(tmp_path, capsys):
    # before: a 60 TB torch.randn; below the machine's limit it would fill memory until the OS killed it
    argv = ["tune", "deit_tiny_patch16_224", "--target", "2x", "--batch-size", "100000000",
            "-o", str(tmp_path / "a.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--batch-size 100000000 (the timed batch) would take 56076.0 GiB" in err


@pytest.mark.parametrize("config,error,message", [
    ({"method": "tome", "base_model": "deit_tiny_patch16_224", "kwargs": {"depth": 10**6}}, UserError,
     "depth must be an integer"),
    ({"method": "tome", "base_model": "deit_tiny_patch16_224", "kwargs": {"img_size": 10**6}}, UserError,
     "img_size must be an integer"),
    ({"method": "tome", "base_model": "deit_tiny_patch16_224", "kwargs": [1]}, ValueError, "'kwargs' object"),
    ({"method": 3, "base_model": "deit_tiny_patch16_224", "kwargs": {}}, ValueError, "'method' and 'base_model'"),
])
def test_a_crafted_tune_config_is_refused_before_a_model_is_built(tmp_path, config, error, message):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"format": tune.CONFIG_FORMAT, **config}))
    with pytest.raises(error, match=message):
        tune.model_from_config(path)


def test_a_tune_config_that_is_not_an_object_is_a_clear_error(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an effvision tune config"):
        tune.load_config(path)


def test_a_tune_config_that_is_not_a_regular_file_or_too_large_is_refused(tmp_path):
    import os

    fifo = tmp_path / "tune.json"
    os.mkfifo(fifo)  # read_text would wait for a writer forever
    with pytest.raises(ValueError, match="not a regular file; not an effvision tune config"):
        tune.load_config(fifo)
    large = tmp_path / "large.json"
    large.write_bytes(b" " * (tune.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ValueError, match="larger than 16777216 bytes; not an effvision tune config"):
        tune.load_config(large)


@pytest.mark.parametrize("threads", ["0", "5000"])
def test_cli_threads_out_of_range_are_an_error(tmp_path, capsys, threads):
    assert main(["tune", "deit_tiny_patch16_224", "--target", "2x", "--threads", threads,
                 "-o", str(tmp_path / "a.json")]) == 1
    assert f"--threads must be from 1 to 1024, got {threads}" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("problem", ["plot exists", "missing folder", "output is a folder"])
def test_cli_output_problems_are_found_before_the_search(tmp_path, capsys, problem):
    """Before: an existing plot was overwritten without --force, and a missing folder or a folder as -o failed only
    after the whole search."""
    output = tmp_path / "a.json"
    if problem == "plot exists":
        (tmp_path / "a.png").write_bytes(b"mine")
        message = "a.png exists (use --force to overwrite)"
    elif problem == "missing folder":
        output = tmp_path / "nowhere" / "a.json"
        message = "does not exist"
    else:
        output = tmp_path
        message = "is a directory"
    assert main(["tune", "deit_tiny_patch16_224", "--target", "2x", "-o", str(output)]) == 1
    assert message in capsys.readouterr().err
    if problem == "plot exists":
        assert (tmp_path / "a.png").read_bytes() == b"mine"


def test_json_nested_too_deeply_is_a_clear_error(tmp_path):
    """Before: RecursionError from json's decoder, shown as 'maximum recursion depth exceeded'."""
    from effvision.bounded_config import read_json_object

    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.json"
    path.write_text(deep)
    with pytest.raises(ValueError, match="nests too deeply"):
        tune.load_config(path)
    with pytest.raises(UserError, match="nests JSON too deeply"):
        read_json_object('{"a": ' + "[" * 8000 + "]" * 8000 + "}", "run/config.json", "config")  # within 16 kB


@pytest.mark.parametrize("options, message", [
    (["-o", "t.png"], "-o and --plot name the same file"),
    (["-o", "t.json", "--plot", "t.json"], "-o and --plot name the same file"),
    (["-o", "t.json", "--plot", "p.png", "--no-plot"], "--no-plot skips"),
    (["-o", "t.json", "--plot", "p.bmp"], "plots are written as"),
    (["-o", "t.json", "--device", "bogus"], "--device 'bogus' is not a device"),
])
def test_cli_outputs_and_options_that_cannot_both_hold_are_refused_before_the_search(
        tmp_path, capsys, monkeypatch, options, message):
    """`-o t.png` made the default plot the config's own name: after the search the config was refused, or with
    --force replaced by the plot; --plot with --no-plot was ignored; a bad --device was torch's raw error."""
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "deit_tiny_patch16_224", "--target", "2x", *options]) == 1
    assert message in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_a_vit_is_a_clear_error(tmp_path, capsys):
    assert main(["tune", "resnet18", "--target", "2x", "-o", str(tmp_path / "t.json"), "--no-plot"]) == 1
    assert "token reduction needs a timm VisionTransformer" in capsys.readouterr().err
    assert main(["reduce-info", "resnet18"]) == 1
    assert "got ResNet" in capsys.readouterr().err


def test_a_very_thin_calibration_image_is_resized_within_bounded_memory():
    """A 1x4000 PNG (102 bytes) made 256x1024000 pixels (3.7 GB) and a 1x100000 one asked for 74 GB: only the
    part the centre crop covers is resized now; ordinary images go the whole-image way (timm's eval)."""
    import time

    import torch.nn.functional as F

    start = time.perf_counter()
    thin = tune._resize_center_crop(torch.rand(3, 1, 100_000), 224, 0.875)
    assert thin.shape == (3, 224, 224) and time.perf_counter() - start < 5
    photo = torch.rand(3, 120, 200, generator=torch.Generator().manual_seed(0))
    whole = F.interpolate(photo[None], size=(256, 427), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(tune._resize_center_crop(photo, 224, 0.875), whole[0, :, 16:240, 101:325])
