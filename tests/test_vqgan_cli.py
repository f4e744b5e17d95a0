"""``effvision train-vqgan``: trains, checkpoints, resumes, and reports user mistakes clearly."""

import numpy as np
import pytest
import torch
from PIL import Image

from effvision.cli import main
from effvision.codecs.vqgan.model import VQGANCodec


@pytest.fixture()
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_training_writes_a_loadable_codec_and_resumes_from_its_checkpoint(image_dir, tmp_path):
    out = tmp_path / "codec.safetensors"
    common = [str(image_dir), "-o", str(out), "--crop", "32", "--batch-size", "2"]
    assert main(["train-vqgan", *common, "--steps", "2"]) == 0
    assert torch.load(tmp_path / "codec.train.pt", weights_only=True)["step"] == 2
    assert main(["train-vqgan", *common, "--steps", "3", "--resume"]) == 0
    assert torch.load(tmp_path / "codec.train.pt", weights_only=True)["step"] == 3
    codec = VQGANCodec.load(out)
    assert codec.index_model is not None and codec.reference_maps.shape[1:] == (2, 2)


def test_clustering_to_more_entries_than_the_codebook_is_a_clear_error(image_dir, tmp_path, capsys):
    code = main(["train-vqgan", str(image_dir), "-o", str(tmp_path / "x.safetensors"), "--crop", "32",
                 "--k", "5000", "--steps", "0"])
    assert code == 1
    assert "K must be between 1 and 1024" in capsys.readouterr().err



def test_a_time_limit_must_be_positive(image_dir, tmp_path, capsys):
    assert main(["train-vqgan", str(image_dir), "-o", str(tmp_path / "x.safetensors"), "--crop", "32",
                 "--minutes", "-1"]) == 1
    assert "--minutes must be a finite number > 0" in capsys.readouterr().err

def test_missing_data_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["train-vqgan", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_codebook_fine_tuning_with_gan_changes_only_codebook_and_quant_convs(image_dir, tmp_path):
    base = tmp_path / "base.safetensors"
    assert main(["train-vqgan", str(image_dir), "-o", str(base), "--crop", "32", "--steps", "0"]) == 0
    tuned = tmp_path / "tuned.safetensors"
    assert main(["train-vqgan", str(image_dir), "-o", str(tuned), "--init", str(base), "--k", "8", "--crop", "32",
                 "--batch-size", "2", "--steps", "2", "--lr", "1e-2", "--gan-weight", "0.5"]) == 0
    before, after = VQGANCodec.load(base).vq.state_dict(), VQGANCodec.load(tuned).vq.state_dict()
    assert after["quantize.embedding.weight"].shape == (8, before["quantize.embedding.weight"].shape[1])
    assert not torch.equal(before["quant_conv.weight"], after["quant_conv.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "decoder.")))
    assert "discriminator" in torch.load(tmp_path / "tuned.train.pt", weights_only=True)


def test_quality_ladder_clusters_the_shipped_codebook_and_decodes_by_config_id():
    import numpy as np
    from PIL import Image

    from effvision.codecs.base import load_codec
    from effvision.codecs.container import parse
    from effvision.codecs.imagefile import decode_image, encode_image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    encoder = load_codec("vqgan", quality=1)
    assert encoder.config_id.endswith("-k16") and encoder.model.codebook_size == 16
    container = parse(encode_image(encoder, image).to_bytes())
    decoder = load_codec("vqgan", config_id=container.config_id)
    assert decoder.fingerprint() == encoder.fingerprint()
    assert decode_image(container, decoder).tobytes() == decode_image(container, encoder).tobytes()
    assert load_codec("vqgan", quality=4).model.codebook_size == 1024


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "100000000"], "--batch-size must be between 1 and 4096"),  # was: a hang drawing 1e8 crops
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--gan-weight", "nan"], "--gan-weight must be a finite number >= 0"),  # was: trained, NaN loss later
    (["--restorer-steps", "-5"], "--restorer-steps must be >= 0"),  # was: silently no restorer
    (["--config", "nope"], "unknown VQGAN config 'nope'"),  # was: "no image of at least 256x256 pixels"
])
def test_options_no_training_can_run_are_clear_errors_before_any_image_is_read(tmp_path, capsys, option, message):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image")  # reading it would be another error
    assert main(["train-vqgan", str(folder), "-o", str(tmp_path / "x.safetensors"), "--crop", "32", *option]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
