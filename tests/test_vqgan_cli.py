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


@pytest.mark.parametrize("k", [1, 2, 1023, 17])
def test_a_config_id_with_a_codebook_no_quality_writes_is_refused(k):
    """A crafted ``-k1`` file (index bands of 0 bits an index) asked for 64 full-size tile decodes from 1 kB;
    ``-k1023`` cost a clustering before its fingerprint was checked."""
    from effvision.codecs.adapters import shipped_weights
    from effvision.codecs.base import load_codec
    from effvision.errors import UserError

    base = next(config for config in shipped_weights("vqgan") if "-k" not in config)
    with pytest.raises(UserError, match=f"to {k}: files of these weights use \\[16, 64, 256, 1024\\]"):
        load_codec("vqgan", config_id=f"{base}-k{k}")


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


def test_an_existing_output_is_kept_without_force_and_checked_before_training(image_dir, tmp_path, capsys):
    """train-vqgan -o replaced an existing file after the training (and a folder failed only then)."""
    out = tmp_path / "codec.safetensors"
    out.write_bytes(b"last week's codec")
    args = [str(image_dir), "--crop", "32", "--batch-size", "2", "--steps", "1"]
    assert main(["train-vqgan", *args, "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"last week's codec"
    assert main(["train-vqgan", *args, "-o", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert main(["train-vqgan", *args, "-o", str(out), "--force"]) == 0
    assert VQGANCodec.load(out).codebook_size > 0


def test_a_training_checkpoint_that_is_a_fifo_is_an_error_not_a_fresh_start(image_dir, tmp_path, capsys):
    """--resume with a FIFO as --checkpoint started from scratch and replaced the FIFO with a file."""
    import os
    import stat

    fifo = tmp_path / "state.train.pt"
    os.mkfifo(fifo)
    assert main(["train-vqgan", str(image_dir), "-o", str(tmp_path / "x.safetensors"), "--crop", "32",
                 "--batch-size", "2", "--steps", "1", "--checkpoint", str(fifo), "--resume"]) == 1
    assert "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_index_model_fitting_encodes_large_images_in_tiles(monkeypatch):
    """A whole 2048 px image took 3.6 GB to encode; tiles keep the index map's shape (and the whole map when one
    tile holds the image)."""
    import effvision.codecs.vqgan.model as vqgan_model
    from effvision.codecs.vqgan.model import load_demo_codec

    codec = load_demo_codec(k=16)
    image = torch.rand(3, 80, 96)
    whole = codec.encode_indices(image[None])[0]
    assert torch.equal(codec._tiled_indices(image, 96), whole)
    calls = []
    original = codec.encode_indices
    monkeypatch.setattr(codec, "encode_indices", lambda x: calls.append(tuple(x.shape[-2:])) or original(x))
    tiled = codec._tiled_indices(image, 32)
    assert tiled.shape == whole.shape and max(calls) == (32, 32) and len(calls) == 9
    assert vqgan_model.FIT_TILE_CELLS * vqgan_model.CELL == 1024


def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(image_dir, tmp_path):
    """The crop generator restarted from --seed on --resume, so a resumed run trained on its first crops again."""
    common = [str(image_dir), "--crop", "32", "--batch-size", "2"]
    assert main(["train-vqgan", *common, "-o", str(tmp_path / "straight.safetensors"), "--steps", "4"]) == 0
    assert main(["train-vqgan", *common, "-o", str(tmp_path / "resumed.safetensors"), "--steps", "2"]) == 0
    assert main(["train-vqgan", *common, "-o", str(tmp_path / "resumed.safetensors"), "--steps", "4", "--resume"]) == 0
    straight = VQGANCodec.load(tmp_path / "straight.safetensors").vq.state_dict()
    resumed = VQGANCodec.load(tmp_path / "resumed.safetensors").vq.state_dict()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_the_time_limit_covers_the_restorer_and_a_resumed_run_retrains_a_stale_one(image_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """--minutes stopped the autoencoder but then ran every restorer step; the resumed run trained the autoencoder
    on and kept the restorer learnt on the old codes (its checkpoint said it was done)."""
    from effvision.training import TimeLimit

    out = tmp_path / "codec.safetensors"
    common = [str(image_dir), "-o", str(out), "--crop", "32", "--batch-size", "2", "--steps", "3",
              "--restorer-steps", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(TimeLimit, "expired", lambda self: self.seconds is not None)  # out of time at once
        assert main(["train-vqgan", *common, "--minutes", "5"]) == 0
    printed = capsys.readouterr().out
    assert "stopped by --minutes at autoencoder step 1 of 3" in printed and "restorer is trained once" in printed
    assert not (tmp_path / "codec.train.restorer.pt").exists()
    assert main(["train-vqgan", *common, "--resume"]) == 0
    state = torch.load(tmp_path / "codec.train.restorer.pt", weights_only=True)
    assert (state["step"], state["trained_for"]) == (2, 3)
    assert main(["train-vqgan", *common[:-4], "--steps", "4", "--restorer-steps", "2", "--resume"]) == 0
    assert "training it afresh" in capsys.readouterr().out  # the autoencoder moved on: step 4 now
    assert torch.load(tmp_path / "codec.train.restorer.pt", weights_only=True)["trained_for"] == 4


def test_resume_needs_a_run_and_a_new_run_does_not_start_over_an_old_one(image_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "codec.safetensors"
    common = [str(image_dir), "-o", str(out), "--crop", "32", "--batch-size", "2"]
    assert main(["train-vqgan", *common, "--steps", "1", "--resume"]) == 1
    assert "there is no" in capsys.readouterr().err  # before: a run from scratch, without a word
    assert main(["train-vqgan", *common, "--steps", "1"]) == 0
    out.unlink()
    assert main(["train-vqgan", *common, "--steps", "2"]) == 1
    assert "holds a training run: pass --resume" in capsys.readouterr().err
    assert main(["train-vqgan", *common, "--steps", "2", "--force"]) == 0
    assert torch.load(tmp_path / "codec.train.pt", weights_only=True)["step"] == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train-vqgan", *common, "--steps", "2", "--force"]) == 1
    assert "without torchrun" in capsys.readouterr().err
