"""`effvision encode/decode/info` through the real CLI entry point, with small test codecs."""

import hashlib
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from effvision import cli
from effvision.codecs.base import ImageCodec, register_codec, unregister_codec
from effvision.errors import UserError

CODEC_COMMANDS = ("encode", "decode", "info")


class LosslessCodec(ImageCodec):
    """8-bit RGB + zlib: exact round trips, so the container/CLI path can be checked bit for bit."""

    name = "lossless-test"
    config_id = "a16"
    alignment = 16

    def fingerprint(self) -> bytes:
        return hashlib.sha256(b"lossless-test").digest()

    def encode(self, image: torch.Tensor) -> list[bytes]:
        pixels = image.mul(255).round().to(torch.uint8).numpy()
        return [zlib.compress(pixels.tobytes())]

    def decode(self, sections, height, width):
        if len(sections) != 1 or sections[0] is None:
            raise UserError("lossless-test: needs exactly one section")
        raw = zlib.decompressobj().decompress(sections[0], 3 * height * width + 1)
        if len(raw) != 3 * height * width:
            raise UserError("lossless-test: wrong payload size")
        return torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(3, height, width).copy()).float() / 255


def _compressai_codec(**_):
    from effvision.codecs.adapters import CompressAIImageCodec
    from tests.codec_factory import image_size_factorized_prior

    torch.manual_seed(0)  # same weights on every load, so the fingerprint matches at decode time
    return CompressAIImageCodec(image_size_factorized_prior(), "factorized-test", "n16")


@pytest.fixture(autouse=True)
def test_codecs(monkeypatch):
    # Only the codec commands: this file tests them, not the import of every other command.
    monkeypatch.setattr(cli, "COMMANDS", {name: cli.COMMANDS[name] for name in CODEC_COMMANDS})
    register_codec("lossless-test", lambda **_: LosslessCodec())
    register_codec("factorized-test", _compressai_codec)
    yield
    unregister_codec("lossless-test")
    unregister_codec("factorized-test")


def random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    array = rng.integers(0, 256, size=(height, width, bands), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if bands == 1 else array, "L" if bands == 1 else None)
    return image.convert(mode) if image.mode != mode else image


@pytest.mark.parametrize(
    ("mode", "width", "height"),
    [("RGB", 1, 1), ("RGB", 37, 20), ("L", 16, 48), ("RGBA", 23, 17), ("LA", 9, 31)],
)
def test_lossless_round_trip_is_exact_for_sizes_and_modes(tmp_path, mode, width, height):
    image = random_image(mode, width, height)
    image.save(tmp_path / "in.png")
    assert (
        cli.main(
            ["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"]
        )
        == 0
    )
    assert cli.main(["decode", str(tmp_path / "x.evc"), "-o", str(tmp_path / "out.png")]) == 0
    decoded = Image.open(tmp_path / "out.png")
    assert decoded.mode == mode and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_palette_image_decodes_as_rgb(tmp_path):
    image = random_image("RGB", 20, 20).convert("P")
    image.save(tmp_path / "in.png")
    cli.main(["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"])
    cli.main(["decode", str(tmp_path / "x.evc"), "-o", str(tmp_path / "out.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(image.convert("RGB")))


def test_exif_orientation_is_applied_so_the_decoded_image_is_upright(tmp_path):
    image = random_image("RGB", 30, 20)  # stored 30 wide, 20 high; tag 6 = show rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "in.png", exif=exif)
    cli.main(["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"])
    cli.main(["decode", str(tmp_path / "x.evc"), "-o", str(tmp_path / "out.png")])
    decoded = Image.open(tmp_path / "out.png")
    assert decoded.size == (20, 30)
    assert np.array_equal(np.asarray(decoded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))


@pytest.mark.parametrize(("mode", "width", "height"), [("RGB", 32, 32), ("RGB", 45, 19), ("L", 20, 33)])
def test_compressai_codec_round_trip_keeps_size_and_mode(tmp_path, mode, width, height):
    random_image(mode, width, height).save(tmp_path / "in.png")
    cli.main(
        ["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "factorized-test"]
    )
    assert cli.main(["decode", str(tmp_path / "x.evc"), "-o", str(tmp_path / "out.png")]) == 0
    decoded = Image.open(tmp_path / "out.png")
    assert (decoded.size, decoded.mode) == ((width, height), mode)


def test_info_reports_codec_size_and_bpp(tmp_path, capsys):
    random_image("RGB", 40, 24).save(tmp_path / "in.png")
    cli.main(["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"])
    capsys.readouterr()
    assert cli.main(["info", "--json", str(tmp_path / "x.evc")]) == 0
    facts = json.loads(capsys.readouterr().out)
    size = (tmp_path / "x.evc").stat().st_size
    assert (facts["codec"], facts["width"], facts["height"], facts["padding"]) == (
        "lossless-test",
        40,
        24,
        [8, 8],
    )
    assert facts["bpp"] == 8 * size / (40 * 24)
    assert [s["kind"] for s in facts["sections"]] == ["codec"]


def test_info_text_names_the_codec_and_sections(tmp_path, capsys):
    random_image("RGBA", 8, 8).save(tmp_path / "in.png")
    cli.main(["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"])
    capsys.readouterr()
    cli.main(["info", str(tmp_path / "x.evc")])
    out = capsys.readouterr().out
    assert "lossless-test (a16)" in out and "8x8 RGBA" in out and "alpha" in out


def test_directory_and_glob_inputs_write_one_file_each(tmp_path):
    (tmp_path / "images").mkdir()
    for index in range(3):
        random_image("RGB", 10 + index, 12, seed=index).save(tmp_path / "images" / f"im{index}.png")
    cli.main(["encode", str(tmp_path / "images"), "-o", str(tmp_path / "evc"), "--codec", "lossless-test"])
    cli.main(["decode", str(tmp_path / "evc" / "*.evc"), "-o", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["im0.png", "im1.png", "im2.png"]


def test_existing_output_is_kept_without_force(tmp_path, capsys):
    random_image("RGB", 8, 8).save(tmp_path / "in.png")
    (tmp_path / "x.evc").write_bytes(b"keep me")
    code = cli.main(
        ["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"]
    )
    assert code == 1 and (tmp_path / "x.evc").read_bytes() == b"keep me"
    assert "--force" in capsys.readouterr().err


def test_force_replaces_existing_output(tmp_path):
    random_image("RGB", 8, 8).save(tmp_path / "in.png")
    (tmp_path / "x.evc").write_bytes(b"old")
    argv = ["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"]
    assert cli.main([*argv, "--force"]) == 0
    assert (tmp_path / "x.evc").read_bytes()[:4] == b"\x89EVC"


def test_stdin_to_stdout_round_trip(tmp_path, monkeypatch, capsysbinary):
    import io
    import sys

    image = random_image("RGB", 12, 7)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(buffer.getvalue())))
    assert cli.main(["encode", "-", "-o", "-", "--codec", "lossless-test"]) == 0
    evc = capsysbinary.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(evc)))
    assert cli.main(["decode", "-", "-o", "-"]) == 0
    decoded = Image.open(io.BytesIO(capsysbinary.readouterr().out))
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_missing_arguments_exit_with_usage_code_2():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["encode"])
    assert exit_info.value.code == 2


def test_corrupt_file_is_one_line_error_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.evc").write_bytes(b"\x89EVC\r\n\x1a\n" + bytes(22))
    assert cli.main(["decode", str(tmp_path / "bad.evc"), "-o", str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "bad.evc").write_bytes(b"nope")
    assert cli.main(["--debug", "info", str(tmp_path / "bad.evc")]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "bad.evc"), "--debug"]) == 1  # after the command too
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "bad.evc")]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_unknown_codec_lists_the_available_ones(tmp_path, capsys):
    random_image("RGB", 8, 8).save(tmp_path / "in.png")
    assert cli.main(["encode", str(tmp_path / "in.png"), "--codec", "nope"]) == 1
    assert "lossless-test" in capsys.readouterr().err


def test_fingerprint_mismatch_is_refused(tmp_path, capsys, monkeypatch):
    random_image("RGB", 16, 16).save(tmp_path / "in.png")
    cli.main(["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.evc"), "--codec", "lossless-test"])
    monkeypatch.setattr(LosslessCodec, "fingerprint", lambda self: b"other weights")
    assert cli.main(["decode", str(tmp_path / "x.evc"), "-o", str(tmp_path / "out.png")]) == 1
    assert "fingerprint" in capsys.readouterr().err


def test_an_output_that_is_the_input_itself_is_refused_even_with_force(tmp_path, capsys):
    """``encode b.png -o b.png --force`` replaced the source image with .evc bytes."""
    random_image("RGB", 8, 8).save(tmp_path / "b.png")
    original = (tmp_path / "b.png").read_bytes()
    (tmp_path / "link.png").symlink_to(tmp_path / "b.png")
    for output in ("b.png", "link.png"):
        argv = ["encode", str(tmp_path / "b.png"), "-o", str(tmp_path / output), "--codec", "lossless-test", "--force"]
        assert cli.main(argv) == 1
        assert "is the input" in capsys.readouterr().err
    assert (tmp_path / "b.png").read_bytes() == original
