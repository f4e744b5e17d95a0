"""`effvision finetune` / `evaluate`: learning, saved files, resume, DDP and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from effvision.cli import main
from effvision.errors import UserError
from effvision.finetune import loop
from effvision.finetune.data import MAX_UNREADABLE_IN_A_ROW, UnreadableImageWarning, load_rgb

TINY = ["img_size=32", "patch_size=8", "embed_dim=48", "depth=4", "num_heads=3", "layers=(1,2)"]
COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def write_dataset(root: Path, per_class=(16, 8), colours=COLOURS) -> Path:
    """Noisy single-colour images, one class per colour: a signal a tiny ViT learns in a few steps."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class, strict=True):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.array(colour)[None, None] + rng.normal(0, 50, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("colours"))


def finetune_args(data, output, *extra, model="sparse_tuning_vit_tiny_patch16_224", epochs=3):
    options = [item for option in TINY for item in ("--option", option)]
    return ["finetune", str(data), "--model", model, "-o", str(output), "--epochs", str(epochs),
            "--batch-size", "16", "--lr", "3e-3", "--workers", "0", *options, *extra]


def test_tiny_finetune_learns_and_evaluate_reproduces_top1(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(finetune_args(dataset, run)) == 0
    history = json.loads((run / "metrics.json").read_text())
    assert len(history) == 3 and history[-1]["val_top1"] >= 80.0  # chance: 33%
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert f"{history[-1]['val_top1']:.2f}%" in capsys.readouterr().out


def test_run_saves_only_trainable_weights(dataset, tmp_path):
    run = tmp_path / "run"
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    saved = load_file(str(run / "trainable.safetensors"))
    assert saved and all(name.startswith(("dense_adapters.", "head.")) for name in saved)
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == sorted(COLOURS) and config["model"] == "sparse_tuning_vit_tiny_patch16_224"


def test_base_weights_come_from_a_local_checkpoint(dataset, tmp_path):
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    path = tmp_path / "base.pth"
    torch.save(base.state_dict(), path)
    config = loop.FinetuneConfig(data=str(dataset), model="sparse_tuning_vit_tiny_patch16_224",
                                 model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3),
                                 checkpoint=str(path), classes=sorted(COLOURS))
    model = loop.create_model(config)
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, base.blocks[2].mlp.fc1.weight)


def test_base_weights_that_are_not_finite_are_refused(dataset, tmp_path):
    """An infinite base weight trained to a NaN loss, and the run was saved (``evaluate`` refused it later)."""
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    state = base.state_dict()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "base.pth")
    config = loop.FinetuneConfig(data=str(dataset), model="sparse_tuning_vit_tiny_patch16_224",
                                 model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3),
                                 checkpoint=str(tmp_path / "base.pth"), classes=sorted(COLOURS))
    with pytest.raises(UserError, match="blocks.1.attn.qkv.weight' holds NaN or infinite values"):
        loop.create_model(config)


def test_integer_base_weights_are_refused(dataset, tmp_path):
    """timm's loader copies an int64 tensor into a float weight without a word: the run trained on truncated
    weights."""
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    state = {key: value.to(torch.int64) if key.startswith("blocks.1.") else value
             for key, value in base.state_dict().items()}
    torch.save(state, tmp_path / "base.pth")
    config = loop.FinetuneConfig(data=str(dataset), model="sparse_tuning_vit_tiny_patch16_224",
                                 model_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3),
                                 checkpoint=str(tmp_path / "base.pth"), classes=sorted(COLOURS))
    with pytest.raises(UserError, match="holds integer or bool tensors where .* has floating-point weights"):
        loop.create_model(config)


def test_interrupted_run_resumes_after_its_last_finished_epoch(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_epoch, calls = loop.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(args[6])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    assert main(finetune_args(dataset, run)) == 130
    assert len(json.loads((run / "metrics.json").read_text())) == 1
    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, **k: calls.append(a[6]) or real_epoch(*a, **k))
    assert main(finetune_args(dataset, run, "--resume")) == 0
    assert calls == [0, 1, 1, 2]
    assert [record["epoch"] for record in json.loads((run / "metrics.json").read_text())] == [1, 2, 3]



def test_time_limit_stops_the_run_and_resume_finishes_it(dataset, tmp_path, monkeypatch, capsys):
    """--minutes: the budget is asked after every step; the run stops inside epoch 2 (a fake clock that runs
    out after the first epoch's 3 steps plus one), keeps epoch 1, and --resume trains epochs 2 and 3."""
    run = tmp_path / "run"
    ticks = iter(range(10**6))
    monkeypatch.setattr(loop.TimeLimit, "elapsed", lambda self: 60.0 * (next(ticks) >= 4))
    assert main(finetune_args(dataset, run, "--minutes", "0.5")) == 0
    out = capsys.readouterr().out
    assert "stopped by --minutes after 1 of 3 epochs" in out and "continue with --resume" in out
    assert [record["epoch"] for record in json.loads((run / "metrics.json").read_text())] == [1]
    monkeypatch.undo()
    assert main(finetune_args(dataset, run, "--resume", "--minutes", "60")) == 0
    assert [record["epoch"] for record in json.loads((run / "metrics.json").read_text())] == [1, 2, 3]


def test_a_time_limit_must_be_positive(dataset, tmp_path, capsys):
    assert main(finetune_args(dataset, tmp_path / "run", "--minutes", "0")) == 1
    assert "--minutes (the time limit) must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--lr", "nan"], "--lr must be a number in [1e-12, 10], got nan"),  # was: ValueError from AdamW
    (["--weight-decay", "nan"], "--weight-decay must be a number in [0, 10], got nan"),  # was: ValueError from AdamW
    (["--warmup-epochs", "-1"], "--warmup-epochs must be a number in [0, 1e+06]"),  # was: accepted
    (["--batch-size", "0"], "--batch-size must be an integer in [1, 65536]"),
    (["--epochs", "0"], "--epochs must be an integer in [1, 1e+06]"),
])
def test_training_options_are_held_to_the_limits_of_a_saved_run(dataset, tmp_path, capsys, option, message):
    assert main(finetune_args(dataset, tmp_path / "run", *option)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

def test_resuming_with_a_different_config_is_refused(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    assert main(finetune_args(dataset, run, "--resume", "--lr", "1e-2", epochs=1)) == 1
    assert "cannot resume" in capsys.readouterr().err
    assert main(finetune_args(dataset, run, epochs=1)) == 1
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"),
    ("no_val", "val does not exist"),
    ("empty", "no class sub-folders"),
    ("class_mismatch", "only in train ['red']"),
    ("empty_class", "cannot read images"),
])
def test_bad_dataset_folders_are_clear_errors(tmp_path, capsys, layout, message):
    data = tmp_path / "data"
    if layout == "no_val":
        (data / "train" / "a").mkdir(parents=True)
    elif layout == "empty":
        (data / "train").mkdir(parents=True)
        (data / "val").mkdir()
    elif layout == "class_mismatch":
        write_dataset(data, per_class=(1, 1))
        for image in (data / "val" / "red").iterdir():
            image.unlink()
        (data / "val" / "red").rmdir()
    elif layout == "empty_class":
        write_dataset(data, per_class=(1, 1))
        (data / "train" / "yellow").mkdir()
        (data / "val" / "yellow").mkdir()
    assert main(finetune_args(data, tmp_path / "run", epochs=1)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ddp_two_cpu_processes_with_gloo(dataset, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "effvision", *finetune_args(dataset, run, epochs=1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((run / "metrics.json").read_text())
    # 48 training images, 16 per batch and process: each process takes 24 images -> one full batch each
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert (run / "trainable.safetensors").is_file()


def corrupt_training_images(data: Path) -> list[Path]:
    """Make three training images unreadable: truncated, not an image, and a decompression bomb."""
    red = sorted((data / "train" / "red").iterdir())
    truncated, junk, bomb = red[0], red[1], red[2]
    truncated.write_bytes(truncated.read_bytes()[:100])
    junk.write_bytes(b"not an image at all")
    Image.new("L", (10000, 10000)).save(bomb)  # 100 MP: over the pixel limit, refused from its header
    return [truncated, junk, bomb]


def test_unreadable_training_images_are_skipped_with_a_warning_naming_each(tmp_path):
    data = write_dataset(tmp_path / "data", per_class=(6, 2))
    bad = corrupt_training_images(data)
    with pytest.warns(UnreadableImageWarning) as caught:
        assert main(finetune_args(data, tmp_path / "run", epochs=1)) == 0
    named = " ".join(str(warning.message) for warning in caught)
    assert all(str(path) in named for path in bad), named
    assert "pixel limit" in named and "not an image" in named
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())) == 1


def test_a_folder_of_unreadable_training_images_stops_with_one_clear_error(tmp_path, capsys):
    """With data-loading workers: the error raised in a worker process reaches the user without its traceback."""
    data = write_dataset(tmp_path / "data", per_class=(8, 1))
    for image in (data / "train").rglob("*.png"):
        image.write_bytes(b"junk")
    args = finetune_args(data, tmp_path / "run", epochs=1)
    args[args.index("--workers") + 1] = "1"
    assert main(args) == 1  # the worker process prints its warnings; pytest sees only this process's
    err = capsys.readouterr().err
    assert f"{MAX_UNREADABLE_IN_A_ROW} training images in a row could not be read" in err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_an_unreadable_validation_image_is_an_error_naming_it(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", per_class=(2, 2))
    broken = sorted((data / "val" / "blue").iterdir())[0]
    broken.write_bytes(b"junk")
    assert main(finetune_args(data, tmp_path / "run", epochs=1)) == 1
    err = capsys.readouterr().err
    assert f"{broken}: not an image file" in err and "Traceback" not in err


def test_training_reads_images_upright_and_composites_alpha_onto_white(tmp_path):
    """The loader is image_io's: EXIF orientation applied, transparent pixels white, 16-bit scaled."""
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), (200, 10, 10)).save(rotated, exif=exif)
    assert load_rgb(str(rotated)).size == (20, 40)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(clear)
    assert load_rgb(str(clear)).getpixel((0, 0)) == (255, 255, 255)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(deep)
    assert load_rgb(str(deep)).getpixel((0, 0)) == (255, 255, 255)


def crafted_run(tmp_path, dataset, change) -> Path:
    run = tmp_path / "run"
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    config = json.loads((run / "config.json").read_text())
    config = change(config)
    (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return run


def _set(key, value, inside=None):
    def change(config):
        (config[inside] if inside else config)[key] = value
        return config

    return change


@pytest.mark.parametrize("change,message", [
    (_set("img_size", 200_000, "model_kwargs"), "img_size must be an integer in [1, 8192]"),  # was: 120 GB
    (_set("embed_dim", 3_000_000, "model_kwargs"), "embed_dim must be an integer"),  # was: 9 GB
    (_set("img_size", 8192, "model_kwargs"), "has 1048576 tokens per image; at most 16384"),  # was: hours an image
    (_set("depth", 10**6, "model_kwargs"), "depth must be an integer"),  # was: minutes of building blocks
    (_set("nested", {"a": list(range(100))}, "model_kwargs"), "model option nested="),
    (_set("workers", 100_000), ": workers must be an integer in [0, 64]"),  # was: 100000 worker processes
    (_set("batch_size", "x"), ": batch_size must be an integer"),  # was: ValueError from the DataLoader
    (_set("classes", []), "classes must be a non-empty list"),
    (_set("pretrained", "yes"), "pretrained must be true or false"),
    (_set("checkpoint", "/etc/passwd"), "cannot load the base checkpoint /etc/passwd"),
    (lambda config: [config], "must be a JSON object, got list"),
    (lambda config: "{not json", "is not valid JSON"),
])
def test_a_crafted_run_config_is_a_clear_error_before_anything_is_built(dataset, tmp_path, capsys, change, message):
    run = crafted_run(tmp_path, dataset, change)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_resuming_a_run_with_a_crafted_config_is_a_clear_error(dataset, tmp_path, capsys):
    run = crafted_run(tmp_path, dataset, _set("workers", -1))
    capsys.readouterr()
    assert main(finetune_args(dataset, run, "--resume", epochs=1)) == 1
    assert "config: workers must be an integer in [0, 64]" in capsys.readouterr().err


@pytest.mark.parametrize("weights,message", [
    (b"junk junk junk", "is not a readable PyTorch checkpoint"),
    ({"pos_embed": torch.zeros(1, 5, 3)}, "size mismatch for pos_embed"),
    # one stored number viewed with stride 0: timm's filter resampled it (3 GB for a 1.7 kB file, patch side 150)
    ({"patch_embed.proj.weight": torch.zeros(1).expand(48, 3, 150, 150)}, "the file stores only 4 bytes"),
])
def test_a_base_checkpoint_that_does_not_fit_is_a_clear_error(dataset, tmp_path, capsys, weights, message):
    path = tmp_path / "base.pth"
    if isinstance(weights, bytes):
        path.write_bytes(weights)
    else:
        torch.save(weights, path)
    assert main(finetune_args(dataset, tmp_path / "run", "--checkpoint", str(path), epochs=1)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("which", ["another architecture", "blocks left out"])
def test_a_base_checkpoint_that_leaves_weights_random_is_refused(dataset, tmp_path, capsys, which):
    """timm loads the base non-strictly for a new class count: a resnet's file, or a ViT file without its blocks,
    used to train from random frozen weights and report success."""
    if which == "another architecture":
        weights = timm.create_model("resnet18", num_classes=3).state_dict()
        expected = "and 122 of its own are not in the model"
    else:
        base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4,
                                 num_heads=3)
        weights = {k: v for k, v in base.state_dict().items() if not k.startswith("blocks.3.")}
        expected = "'blocks.3.norm1.weight'"
    path = tmp_path / "base.pth"
    torch.save(weights, path)
    assert main(finetune_args(dataset, tmp_path / "run", "--checkpoint", str(path), epochs=1)) == 1
    err = capsys.readouterr().err
    assert "does not fit sparse_tuning_vit_tiny_patch16_224: it has no weights for" in err and expected in err
    assert "Traceback" not in err and not (tmp_path / "run" / "trainable.safetensors").exists()


def test_weight_loads_are_recorded_only_inside_the_context():
    layer = torch.nn.Linear(2, 2)
    from effvision.torch_checkpoint import recorded_weight_loads

    with recorded_weight_loads() as loads:
        layer.load_state_dict({"weight": torch.zeros(2, 2)}, strict=False)
    layer.load_state_dict(layer.state_dict())
    assert [result.missing_keys for result in loads] == [["bias"]]
    assert torch.nn.Module.load_state_dict.__name__ == "load_state_dict"


def test_a_model_larger_than_this_machine_is_refused_before_it_is_built(dataset, tmp_path, capsys):
    args = ["finetune", str(dataset), "--model", "vit_tiny_patch16_224", "-o", str(tmp_path / "run"), "--workers", "0",
            "--option", "embed_dim=16384", "--option", "depth=256", "--option", "num_heads=16"]  # 3 TB
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "GiB of weights; this machine has" in err


def test_too_many_data_loading_workers_are_refused(dataset, tmp_path, capsys):
    args = finetune_args(dataset, tmp_path / "run", epochs=1)
    args[args.index("--workers") + 1] = "1000"
    assert main(args) == 1
    assert "--workers must be an integer in [0, 64], got 1000" in capsys.readouterr().err


def test_a_fifo_base_checkpoint_or_training_state_is_an_error_not_a_hang(dataset, tmp_path, capsys):
    """torch.load blocks on a FIFO: --checkpoint FIFO, and --resume of a run whose training state is a FIFO."""
    fifo = tmp_path / "base.pth"
    os.mkfifo(fifo)
    assert main(finetune_args(dataset, tmp_path / "run", "--checkpoint", str(fifo), epochs=1)) == 1
    assert "is not a regular file" in capsys.readouterr().err
    run = tmp_path / "run2"
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    state = run / "training_state.pt"
    state.unlink(missing_ok=True)
    os.mkfifo(state)
    assert main(finetune_args(dataset, run, "--resume", epochs=1)) == 1
    assert "is not a regular file" in capsys.readouterr().err


def test_batchnorm_models_need_two_images_a_training_batch(dataset, tmp_path, capsys):
    """CLCA's aggregation head has BatchNorm, which cannot train on a batch of one (before: its ValueError)."""
    args = finetune_args(dataset, tmp_path / "run", epochs=1, model="clca_topk_vit_tiny_patch16_224")
    args[args.index("--batch-size") + 1] = "1"
    assert main(args) == 1
    assert "need at least 2 images in every training batch" in capsys.readouterr().err


def test_a_symlink_loop_in_a_dataset_is_walked_once(tmp_path):
    """torchvision's walk follows links: two links to '..' in a class folder made it exponential (5 GB)."""
    from torchvision.datasets import ImageFolder

    from effvision.finetune.data import CheckedImageFolder

    root = write_dataset(tmp_path / "data", per_class=(2, 1))
    plain = CheckedImageFolder(str(root / "train"), None, False).samples
    assert plain == ImageFolder(str(root / "train")).samples and len(plain) == 6
    (root / "train" / "red" / "loop").symlink_to("..")  # one link (torchvision: 40 levels deep, 246 samples)
    looped = CheckedImageFolder(str(root / "train"), None, False).samples
    # red's folder now reaches train/ once more (blue and green as red): each real folder is listed once per class
    assert len(looped) == 6 + 4 and len({path for path, _ in looped}) == len(looped)


@pytest.mark.parametrize("change,message", [
    (lambda state: state["scheduler"].update(base_lrs=[float("nan")]), "are not all finite"),  # was: NaN weights, rc 0
    (lambda state: state.update(epochs_done=-5), "-5 epochs done, outside [0, 1]"),  # was: epochs -4..2
    (lambda state: state.pop("optimizer"), "is not a training state of this run (KeyError"),
])
def test_a_crafted_training_state_is_a_clear_error(dataset, tmp_path, capsys, change, message):
    run = tmp_path / "run"
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    state = torch.load(run / "training_state.pt", weights_only=True)
    change(state)
    torch.save(state, run / "training_state.pt")
    capsys.readouterr()
    assert main(finetune_args(dataset, run, "--resume", epochs=1)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_run_that_failed_before_its_first_epoch_ended_can_be_started_again(dataset, tmp_path, capsys):
    """Its folder held only config.json, and a new run was refused ("already holds a run"); a folder with a trained
    epoch still is."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # what a run that failed in its first epoch leaves
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    capsys.readouterr()
    assert main(finetune_args(dataset, run, epochs=1)) == 1
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_class_lists_in_messages_are_cut_to_twenty_names(dataset, tmp_path, capsys):
    """A crafted run with 900000 class names printed an 8 MB error line."""
    run = crafted_run(tmp_path, dataset, _set("classes", [f"c{i}" for i in range(5000)]))
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 1
    err = capsys.readouterr().err
    assert "... (5000 in all)]" in err and len(err) < 2000, err[:300]


@pytest.mark.parametrize("model", ["clca_ppt_vit_tiny_patch16_224", "clca_sparse_tuning_vit_tiny_patch16_224"])
def test_a_clca_model_fine_tunes_from_its_bases_weights(dataset, tmp_path, model):
    """The README's CLCA recipe (``--checkpoint`` the base's weights): timm drops the base's 1000-class head
    for the new class count, and CLCA then replaces that head; the check that no base weight stays random
    allowed only CLCA's own classifier (head.pointwise) to be missing, so every such run was refused."""
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    path = tmp_path / "base.pth"
    torch.save(base.state_dict(), path)
    assert main(finetune_args(dataset, tmp_path / "run", "--checkpoint", str(path), model=model, epochs=1)) == 0


def test_pretrained_without_network_names_the_weights_and_what_to_do(dataset, monkeypatch, tmp_path, capsys):
    """Offline, ``finetune --pretrained`` printed a bare LocalEntryNotFoundError."""
    import timm.models._hub as timm_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the disk cache")

    monkeypatch.setattr(timm_hub, "hf_hub_download", offline)
    assert main(finetune_args(dataset, tmp_path / "run", "--pretrained", epochs=1)) == 1
    err = capsys.readouterr().err
    assert "could not get the pretrained weights of sparse_tuning_vit_tiny_patch16_224" in err
    assert "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["NaN", "empty", "integers"])
def test_evaluate_refuses_damaged_trained_weights(dataset, tmp_path, capsys, damage):
    """NaN weights, a file holding no weights, or integer weights were loaded and scored (exit 0)."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    weights = load_file(str(run / "trainable.safetensors"))
    if damage == "NaN":
        weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    elif damage == "empty":
        weights = {}
    else:
        weights = {k: v.long() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(run / "trainable.safetensors"))
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 1
    err = capsys.readouterr().err
    assert "trainable.safetensors" in err and "Traceback" not in err


def test_resume_without_the_training_state_is_refused_when_trained_weights_exist(dataset, tmp_path, capsys):
    """The run restarted at epoch 0 over the trained weights and exited 0."""
    run = tmp_path / "run"
    assert main(finetune_args(dataset, run, epochs=1)) == 0
    (run / "training_state.pt").unlink()
    weights = (run / "trainable.safetensors").read_bytes()
    assert main(finetune_args(dataset, run, "--resume", epochs=1)) == 1
    assert "no training_state.pt" in capsys.readouterr().err
    assert (run / "trainable.safetensors").read_bytes() == weights


def test_a_plain_timm_cnn_fine_tunes(dataset, tmp_path):
    """--help offers any timm name; resnet18 failed with "'ResNet' object has no attribute 'patch_embed'"."""
    argv = ["finetune", str(dataset), "--model", "resnet18", "-o", str(tmp_path / "run"), "--epochs", "1",
            "--batch-size", "16", "--workers", "0", "--option", "num_classes=3"]
    assert main([a for a in argv if a not in ("--option", "num_classes=3")]) == 0


def test_false_in_any_case_is_false_and_a_non_boolean_switch_is_refused(dataset, tmp_path, capsys):
    """freeze=false was the string "false", which is true: the backbone stayed frozen without a word."""
    from effvision.commands.finetune import parse_options

    assert parse_options(["freeze=false", "average=TRUE", "inner=None", "keep_rate=0.5"]) == {
        "freeze": False, "average": True, "inner": None, "keep_rate": 0.5}
    with pytest.raises(ValueError, match="clca_cache must be True or False"):
        timm.create_model("clca_topk_vit_tiny_patch16_224", clca_cache="no", img_size=32, patch_size=8,
                          embed_dim=48, depth=4, num_heads=3, layers=(1, 2))
    run = tmp_path / "run"
    assert main(finetune_args(dataset, run, "--option", "freeze=False", epochs=1)) == 0
    assert any(name.startswith("blocks.") for name in load_file(str(run / "trainable.safetensors")))


def test_a_run_folder_works_from_another_directory_and_resumes_with_another_spelling(
        dataset, tmp_path, monkeypatch, capsys):
    """The data path was stored as typed: evaluating from elsewhere failed ("cannot read images from data/val"),
    and --resume with the absolute spelling of the same folder was refused as a different config."""
    monkeypatch.chdir(dataset.parent)
    run = tmp_path / "run"
    assert main(finetune_args(Path(dataset.name), run, epochs=1)) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(run)]) == 0
    old_style = json.loads((run / "config.json").read_text())
    old_style["data"] = os.path.relpath(dataset, run.parent)  # a run written before paths were resolved
    (run / "config.json").write_text(json.dumps(old_style))
    config = loop.read_run_config(run / "config.json")
    config.data = str(dataset)
    assert loop.prepare_output(config, run, resume=True) is not None


def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(dataset, tmp_path, monkeypatch):
    """With --workers 0 the crops and flips drew from torch's global generator, which a resumed run had not
    advanced as far: its weights came out different."""
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert main(finetune_args(dataset, whole, epochs=2)) == 0
    real_epoch = loop.train_one_epoch

    def stop_at_epoch_two(*args, **kwargs):
        if args[6] == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", stop_at_epoch_two)
    torch.manual_seed(123)  # whatever the process did before must not matter
    assert main(finetune_args(dataset, interrupted, epochs=2)) == 130
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    torch.manual_seed(456)
    assert main(finetune_args(dataset, interrupted, "--resume", epochs=2)) == 0
    expected = load_file(str(whole / "trainable.safetensors"))
    resumed = load_file(str(interrupted / "trainable.safetensors"))
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_evaluate_and_finetune_options_are_checked_with_clear_errors(dataset, tmp_path, capsys):
    """``evaluate --batch-size 0`` silently used the run's batch size and -3 was a raw ValueError after the model
    was built; ``--device gpu`` was torch's RuntimeError; ``finetune -o FILE`` said "cannot write FILE/config.json"."""
    for value in ("0", "-3"):
        assert main(["evaluate", str(tmp_path / "no-run"), "--batch-size", value]) == 1
        assert f"--batch-size must be between 1 and 4096, got {value}" in capsys.readouterr().err
    with pytest.raises(UserError, match="--device 'gpu' is not a device"):
        loop.resolve_device("gpu")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(finetune_args(dataset, afile, epochs=1)) == 1
    assert f"--output {afile} exists and is not a folder" in capsys.readouterr().err


def test_an_unreadable_training_image_is_one_warning_line_once(tmp_path):
    """A folder of three bad files printed about forty lines: each skip again, each with the source line of torch's
    DataLoader code that Python's warning format adds."""
    data = write_dataset(tmp_path / "data", per_class=(6, 2))
    junk = sorted((data / "train" / "red").iterdir())[1]
    junk.write_bytes(b"not an image at all")
    command = [sys.executable, "-W", "always", "-m", "effvision", *finetune_args(data, tmp_path / "run", epochs=2)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # -W always: the dataset must not repeat it
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if str(junk) in line or "warnings.warn" in line]
    assert len(lines) == 1 and "effvision finetune: warning: skipped an unreadable" in lines[0], lines
