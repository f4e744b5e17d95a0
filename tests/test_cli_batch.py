"""Batches work like gzip's: every input is processed, each failure is one line naming the user's path, the
exit code is 1 if any failed, and a failed input leaves no output."""

import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effvision import cli
from effvision.codecs.base import ImageCodec, register_codec, unregister_codec
from effvision.errors import UserError


class ZlibCodec(ImageCodec):
    """Lossless 8-bit RGB + zlib; refuses to encode an all-black image (a codec failure on one input)."""

    name, config_id, alignment = "zlib-batch-test", "z", 1

    def fingerprint(self) -> bytes:
        return b"zlib-batch-test"

    def encode(self, image: torch.Tensor) -> list[bytes]:
        if not image.any():
            raise RuntimeError("cannot encode black")
        return [zlib.compress(image.mul(255).round().to(torch.uint8).numpy().tobytes())]

    def decode(self, sections, height, width):
        raw = zlib.decompress(sections[0])
        if len(raw) != 3 * height * width:
            raise UserError("wrong payload size")
        return torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(3, height, width).copy()).float() / 255


@pytest.fixture(autouse=True)
def codec(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {name: cli.COMMANDS[name] for name in ("encode", "decode", "info")})
    register_codec(ZlibCodec.name, lambda **_: ZlibCodec())
    yield
    unregister_codec(ZlibCodec.name)


def save_random_image(path, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(1, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def encode(*argv: str) -> int:
    return cli.main(["encode", *argv, "--codec", ZlibCodec.name, "--device", "cpu"])


def error_lines(capsys) -> list[str]:
    """The error lines on stderr (which also carries progress and one line per written file)."""
    return [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_a_single_missing_input_with_an_output_file_is_one_clear_error(tmp_path, capsys, command):
    """Every input missing but -o naming a file: the missing input is reported, nothing else (it used to end
    in a ValueError from pairing no inputs with one output)."""
    missing = str(tmp_path / ("missing.png" if command == "encode" else "missing.evc"))
    output = str(tmp_path / ("out.evc" if command == "encode" else "out.png"))
    assert cli.main([command, missing, "-o", output]) == 1
    assert error_lines(capsys) == [f"effvision {command}: error: {missing}: no such file"]
    assert not Path(output).exists()


def test_encode_goes_on_after_bad_inputs_and_reports_each_once(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    first = save_random_image(images / "a.png", 0)
    (images / "b.png").write_text("not an image")
    Image.new("RGB", (4, 4)).save(images / "c.png")  # the codec fails on this one
    last = save_random_image(images / "d.png", 1)
    missing = str(tmp_path / "missing.png")
    code = encode(str(images), missing, "-o", str(tmp_path / "out"))
    assert code == 1
    assert error_lines(capsys) == [
        f"effvision encode: error: {missing}: no such file",
        f"effvision encode: error: {images / 'b.png'}: not an image file, or not one of the formats read "
        "(PNG, JPEG, BMP, TIFF, WEBP, PPM, GIF, AVIF)",
        f"effvision encode: error: {images / 'c.png'}: RuntimeError: cannot encode black "
        "(run with --debug for details)",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.evc", "d.evc"]
    assert cli.main(["decode", str(tmp_path / "out"), "-o", str(tmp_path / "back")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back" / "a.png")), first)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back" / "d.png")), last)


def test_decode_goes_on_after_missing_corrupt_and_existing_outputs(tmp_path, capsys):
    for index in range(3):
        save_random_image(tmp_path / f"im{index}.png", index)
    assert encode(str(tmp_path / "im0.png"), str(tmp_path / "im1.png"), str(tmp_path / "im2.png"),
                  "-o", str(tmp_path / "evc")) == 0
    evc = tmp_path / "evc"
    data = (evc / "im1.evc").read_bytes()
    (evc / "im1.evc").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "im2.png").write_bytes(b"keep me")
    capsys.readouterr()
    argv = ["decode", str(evc / "im0.evc"), str(evc / "nope.evc"), str(evc / "im1.evc"), str(evc / "im2.evc")]
    assert cli.main([*argv, "-o", str(tmp_path / "out")]) == 1
    lines = error_lines(capsys)
    assert [line.split(": ")[:3] for line in lines] == [
        ["effvision decode", "error", str(evc / "nope.evc")],
        ["effvision decode", "error", str(evc / "im1.evc")],
        ["effvision decode", "error", str(evc / "im2.evc")],
    ]
    assert "--force" in lines[2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["im0.png", "im2.png"]
    assert (tmp_path / "out" / "im2.png").read_bytes() == b"keep me"


def test_an_unwritable_output_folder_names_the_destination_not_a_temporary_file(tmp_path, capsys, monkeypatch):
    save_random_image(tmp_path / "a.png", 0)

    def refused(prefix, suffix, dir):  # what mkstemp does in a read-only folder (tests may run as root)
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}x1y2{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    assert encode(str(tmp_path / "a.png"), "-o", str(tmp_path / "a.evc")) == 1
    assert error_lines(capsys) == [
        f"effvision encode: error: {tmp_path / 'a.png'}: cannot write {tmp_path / 'a.evc'}: Permission denied"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_codec_that_cannot_be_loaded_ends_the_run_with_one_line(tmp_path, capsys):
    save_random_image(tmp_path / "a.png", 0)
    save_random_image(tmp_path / "b.png", 1)
    argv = ["encode", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(tmp_path / "out"), "--codec", "nope"]
    assert cli.main(argv) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and "unknown codec 'nope'" in lines[0]


def test_info_reports_each_bad_file_and_describes_the_good_ones(tmp_path, capsys):
    save_random_image(tmp_path / "a.png", 0)
    encode(str(tmp_path / "a.png"))
    (tmp_path / "bad.evc").write_bytes(b"nope")
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "bad.evc"), str(tmp_path / "a.evc")]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"effvision info: error: {tmp_path / 'bad.evc'}: not an .evc file (bad magic)"
    assert "zlib-batch-test" in captured.out


def test_a_reader_that_closes_the_pipe_ends_the_batch_quietly(tmp_path, monkeypatch, capsys):
    from effvision.codecs.container import Container, Mode, Section
    from effvision.commands import info

    container = Container(codec="c", config_id="", fingerprint=b"", width=8, height=8, mode=Mode.RGB,
                          sections=(Section(b"x", tile_start=True),), tile_width=8, tile_height=8)
    (tmp_path / "a.evc").write_bytes(container.to_bytes())
    (tmp_path / "b.evc").write_bytes(container.to_bytes())
    written = []

    def closed_pipe(path, facts):  # what print() raises once `| head` has exited
        written.append(path)
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(info, "_text", closed_pipe)
    assert cli.main(["info", str(tmp_path / "a.evc"), str(tmp_path / "b.evc")]) == 141
    assert len(written) == 1 and "error" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["encode", "decode"])
@pytest.mark.parametrize("threads", ["-2", "100000", str(2**31)])
def test_threads_out_of_range_are_a_clear_error(tmp_path, capsys, command, threads):
    """Before: 100000 ended in libgomp's "out of memory" and 2^31 in a ValueError traceback line."""
    assert cli.main([command, str(tmp_path / "x.png"), "--threads", threads]) == 1
    assert f"--threads must be from 0 (automatic, the default) to 1024, got {threads}" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_a_max_pixels_below_one_is_a_clear_error(tmp_path, capsys, limit):
    assert cli.main(["decode", str(tmp_path / "x.evc"), "--max-pixels", limit]) == 1
    assert f"--max-pixels must be 1 or more, got {limit}" in capsys.readouterr().err



def test_a_folders_broken_links_and_pipes_named_like_images_are_reported_not_skipped(tmp_path):
    """A dangling x.png, a looping link and a FIFO inside a folder were skipped without a word (named
    directly, each was an error)."""
    import os

    from effvision.io_utils import expand_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "b.png").symlink_to("nowhere.png")
    (folder / "loop.png").symlink_to("loop.png")
    os.mkfifo(folder / "c.png")
    errors: list[str] = []
    assert expand_inputs([str(folder)], [".png"], errors) == [str(folder / "a.png")]
    assert [message.split(":")[0] for message in errors] == [str(folder / name) for name in ("b.png", "c.png",
                                                                                             "loop.png")]
    with pytest.raises(UserError, match="b.png: not a regular file"):
        expand_inputs([str(folder)], [".png"])
