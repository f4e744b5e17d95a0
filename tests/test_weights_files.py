"""Weights files effvision hands to another reader (timm's ``pretrained_cfg_overlay`` / ``checkpoint_path``, the
export command's ``--checkpoint``) are checked as effvision's own loaders check them: a regular file, no code run,
every tensor backed by as many stored bytes as it claims (effvision.torch_checkpoint.check_weights_file)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from effvision.bounded_config import check_timm_options
from effvision.cli import main
from effvision.errors import UserError
from effvision.torch_checkpoint import check_weights_file


def test_real_checkpoints_pass(tmp_path):
    shared = torch.arange(12.0)
    torch.save({"state_dict": {"a": shared[:6], "b": shared[6:].view(2, 3)}, "epoch": 3}, tmp_path / "ok.pth")
    check_weights_file(tmp_path / "ok.pth")  # views into one storage, each within it
    save_file({"a": torch.zeros(2, 3)}, tmp_path / "ok.safetensors")
    check_weights_file(tmp_path / "ok.safetensors")


@pytest.mark.parametrize("payload", [
    {"patch_embed.proj.weight": torch.zeros(1).expand(192, 3, 150, 150)},
    {"model": {"pos_embed": torch.zeros(1, 1, 1).expand(1, 10**4, 10**4)}, "epoch": 1},
    [{"deep": [torch.zeros(2).expand(10, 2)]}],
])
def test_stride_0_views_are_refused_wherever_they_sit(tmp_path, payload):
    torch.save(payload, tmp_path / "crafted.pth")
    with pytest.raises(UserError, match="the file stores only"):
        check_weights_file(tmp_path / "crafted.pth")


def test_a_fifo_or_a_folder_is_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo.pth")
    for path in (tmp_path / "fifo.pth", tmp_path, tmp_path / "missing.pth"):
        with pytest.raises(UserError, match="does not exist or is not a regular file"):
            check_weights_file(path)


def test_timm_options_naming_a_crafted_file_are_refused(tmp_path):
    torch.save({"patch_embed.proj.weight": torch.zeros(1).expand(192, 3, 150, 150)}, tmp_path / "crafted.pth")
    for options in ({"pretrained_cfg_overlay": {"file": str(tmp_path / "crafted.pth")}},
                    {"checkpoint_path": str(tmp_path / "crafted.pth")}):
        with pytest.raises(UserError, match="the file stores only"):
            check_timm_options(options)


def test_export_checkpoint_that_is_no_state_dict_is_a_clear_error(tmp_path, capsys):
    """Before: "TypeError: Expected state_dict to be dict-like" from load_state_dict."""
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert main(["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--checkpoint",
                 str(tmp_path / "list.pth")]) == 1
    err = capsys.readouterr().err
    assert "holds no state dict" in err and "TypeError" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_tune_checkpoint_that_is_a_fifo_is_an_error_not_a_hang(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.pth")
    assert main(["tune", "deit_tiny_patch16_224", "--target", "2x", "--checkpoint", str(tmp_path / "fifo.pth"),
                 "-o", str(tmp_path / "a.json")]) == 1
    assert "is not a regular file" in capsys.readouterr().err


def test_safetensors_readers_refuse_a_fifo_instead_of_blocking(tmp_path, capsys):
    """safe_open waits for a writer forever: train-codec --init / train-vqgan --init / --checkpoint hung."""
    from effvision.codecs.mambaic.checkpoint import load_checkpoint
    from effvision.codecs.vqgan.model import VQGANCodec

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="does not exist or is not a regular file"):
        load_checkpoint(fifo)
    with pytest.raises(UserError, match="do not exist or are not a regular file"):
        VQGANCodec.load(fifo)
    (tmp_path / "photos").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 120, 30)).save(tmp_path / "photos" / "a.png")
    assert main(["train-codec", "--data", str(tmp_path / "photos"), "--init", str(fifo), "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 1
    assert "is not a regular file" in capsys.readouterr().err


def test_a_legacy_format_torch_file_is_refused_before_torch_allocates_its_storages(tmp_path):
    """torch allocates a legacy file's storages at the sizes its pickle declares and fills only those the file
    lists: a 349-byte file claimed 7 GB, and the unfilled bytes came back as the process's own heap."""
    from effvision.torch_checkpoint import load_torch_checkpoint
    from effvision.training import load_training_state

    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    for load in (load_torch_checkpoint, check_weights_file, load_training_state):
        with pytest.raises(UserError, match="legacy format"):
            load(path)
    torch.save({"w": torch.ones(3)}, path)  # the same, as torch.save writes it since PyTorch 1.6
    assert torch.equal(load_torch_checkpoint(path)["w"], torch.ones(3))


def test_a_torch_archive_with_compressed_records_is_refused_before_they_inflate(tmp_path):
    """torch.save stores records uncompressed; a 66 kB deflated data.pkl ran torch's unpickler for 37 s, a 4 MB
    deflated tensor record inflated to 5 GB before torch compared its size."""
    import io
    import zipfile

    from effvision.torch_checkpoint import load_torch_checkpoint

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data/0"):  # the tensor record, padded with 4 MB of zeros, deflated
                archive.writestr(info.filename, data + bytes(1 << 22), compress_type=zipfile.ZIP_DEFLATED)
            else:
                archive.writestr(info.filename, data)
    assert path.stat().st_size < 100_000
    with pytest.raises(UserError, match="declare .* bytes in a file of"):
        load_torch_checkpoint(path)


def test_a_torch_archive_of_too_many_records_is_refused(tmp_path, monkeypatch):
    from effvision import torch_checkpoint

    path = tmp_path / "many.pth"
    torch.save({f"w{i}": torch.zeros(1) for i in range(10)}, path)  # a record per storage
    monkeypatch.setattr(torch_checkpoint, "MAX_ARCHIVE_RECORDS", 8)
    with pytest.raises(UserError, match="records"):
        torch_checkpoint.load_torch_checkpoint(path)


def test_a_safetensors_header_larger_than_any_real_one_is_refused_before_safetensors_parses_it(tmp_path):
    """safetensors turns every header entry into Python objects (about 20 times its bytes): a 99 MB header of
    1.5 million zero-size tensors took 2 GB and 18 s before the shape check refused the file."""
    from effvision.codecs.mambaic.checkpoint import load_checkpoint
    from effvision.codecs.vqgan.model import VQGANCodec
    from effvision.io_utils import MAX_SAFETENSORS_HEADER_BYTES

    path = tmp_path / "huge-header.safetensors"
    path.write_bytes((MAX_SAFETENSORS_HEADER_BYTES + 1).to_bytes(8, "little") + b"{" + b" " * 1000)
    for load in (check_weights_file, load_checkpoint, VQGANCodec.load):
        with pytest.raises(UserError, match="declares a header of"):
            load(path)
    assert main(["export", "deit_tiny_patch16_224", str(tmp_path / "m.onnx"), "--checkpoint", str(path)]) == 1


def test_a_pytorch_checkpoint_where_safetensors_are_read_is_named_as_such(tmp_path):
    """``encode --codec vqgan --checkpoint x.pth`` said the file "declares a header of 578712552184433488 bytes"."""
    from effvision.errors import UserError
    from effvision.io_utils import check_safetensors_file

    torch.save({"w": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(UserError, match="is a PyTorch checkpoint .torch.save., not a safetensors file"):
        check_safetensors_file(tmp_path / "x.pth", "VQGAN weights")
