"""encode -> decode through the CLI with the real codecs (MambaIC at test width, VQGAN small; random weights
saved as checkpoints, so the tests need no download), on several sizes and modes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from effvision import cli
from tests.codec_factory import tiny_mambaic_config

CODEC_COMMANDS = ("encode", "decode", "info")


def save_mambaic(path):
    from effvision.codecs.mambaic import MambaIC
    from effvision.codecs.mambaic.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MambaIC(tiny_mambaic_config())
    model.update()
    save_checkpoint(model, path)


def save_vqgan(path):
    from effvision.codecs.vqgan.config import SMALL_F16
    from effvision.codecs.vqgan.model import VQGANCodec

    torch.manual_seed(0)
    references = torch.randint(0, SMALL_F16.n_embed, (2, 4, 4))  # fits the index entropy model
    VQGANCodec(SMALL_F16, reference_maps=references).save(path)


@pytest.fixture(autouse=True)
def codec_commands_only(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {name: cli.COMMANDS[name] for name in CODEC_COMMANDS})


@pytest.fixture(scope="module", params=["mambaic", "vqgan"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}-random.safetensors"
    (save_mambaic if request.param == "mambaic" else save_vqgan)(path)
    return request.param, path


def write_images(folder, codec: str) -> dict[str, Image.Image]:
    """Images of sizes that are not multiples of the codecs' alignment: RGB for both codecs, plus RGBA
    and L for the fast VQGAN (MambaIC takes seconds per image on a CPU; modes are codec-independent)."""
    rng = np.random.default_rng(0)
    images = {"rgb": Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))}
    if codec == "vqgan":
        images["alpha"] = Image.fromarray(rng.integers(0, 256, (18, 30, 4), dtype=np.uint8), "RGBA")
        images["gray"] = Image.fromarray(rng.integers(0, 256, (33, 20), dtype=np.uint8))
    folder.mkdir()
    for name, image in images.items():
        image.save(folder / f"{name}.png")
    return images


def test_round_trip_keeps_size_and_mode(checkpoint, tmp_path, capsys):
    name, path = checkpoint
    images = write_images(tmp_path / "in", name)
    argv = ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "evc"), "--codec", name, "--checkpoint", str(path)]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert cli.main(["decode", str(tmp_path / "evc"), "-o", str(tmp_path / "out"), "--checkpoint", str(path)]) == 0
    for stem, original in images.items():
        decoded = Image.open(tmp_path / "out" / f"{stem}.png")
        assert (decoded.size, decoded.mode) == (original.size, original.mode)
    if "alpha" in images:
        alpha = np.asarray(Image.open(tmp_path / "out" / "alpha.png").getchannel("A"))
        assert np.array_equal(alpha, np.asarray(images["alpha"].getchannel("A")))
    capsys.readouterr()
    assert cli.main(["info", "--json", str(tmp_path / "evc" / "rgb.evc")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["codec"], facts["width"], facts["height"]) == (name, 56, 40)


def test_decoding_without_the_checkpoint_names_the_fix(tmp_path, capsys):
    name, path = "vqgan", tmp_path / "vqgan-random.safetensors"
    save_vqgan(path)
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    cli.main(["encode", str(tmp_path / "in.png"), "--codec", name, "--checkpoint", str(path)])
    capsys.readouterr()
    assert cli.main(["decode", str(tmp_path / "in.evc"), "-o", str(tmp_path / "out.png")]) == 1
    assert "--checkpoint" in capsys.readouterr().err


def test_encode_with_effort_shows_the_refinement_steps_and_decodes(tmp_path, capsys):
    path = tmp_path / "vqgan-random.safetensors"
    save_vqgan(path)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    argv = ["encode", str(tmp_path / "in.png"), "--codec", "vqgan", "--checkpoint", str(path)]
    assert cli.main([*argv, "--effort", "2"]) == 0
    assert "refine indices" in capsys.readouterr().err  # minutes a photo on a CPU: the user sees the steps
    assert cli.main(["decode", str(tmp_path / "in.evc"), "-o", str(tmp_path / "out.png"), "--checkpoint",
                     str(path)]) == 0
    assert Image.open(tmp_path / "out.png").size == (64, 48)
    assert cli.main([*argv, "--force"]) == 0
    assert "refine" not in capsys.readouterr().err  # no effort, no bar


def test_encode_reports_the_mode_it_stores(tmp_path, capsys):
    """A palette image was reported as "P" while ``info`` (and decode) say what is stored, RGB."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).convert("P").save(tmp_path / "p.png")
    assert cli.main(["encode", str(tmp_path / "p.png"), "-o", str(tmp_path / "p.evc"), "--device", "cpu"]) == 0
    assert "32x24 RGB (from P)," in capsys.readouterr().err
