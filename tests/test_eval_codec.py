"""``effvision eval-codec`` and :mod:`effvision.codecs.evaluation`: real files, matched bytes, ladders, errors."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effvision.cli import main
from effvision.codecs import evaluation
from effvision.codecs.adapters import CompressAIImageCodec
from effvision.codecs.base import register_codec, unregister_codec
from effvision.errors import UserError
from tests.codec_factory import image_size_factorized_prior

torch.set_num_threads(1)

CODEC = "evaltest"


def _photo_like(rng: np.random.Generator, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth colour gradients plus mild noise: compressible like a photo, not a flat fill."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([x, y, 0.5 * (x + y)], axis=-1) * 200 + 30
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(_photo_like(rng)).save(folder / name)
    return folder


@pytest.fixture
def two_quality_codec():
    """A registered codec shipping qualities 1 and 2 (random-weight factorized priors of different widths)."""

    def loader(quality=None, checkpoint=None, device="cpu", config_id=None):
        quality = quality or 1
        if quality not in (1, 2):
            raise UserError(f"no shipped {CODEC} weights for quality {quality}")
        torch.manual_seed(quality)
        model = image_size_factorized_prior(channels=8, latent_channels=8 * quality)
        return CompressAIImageCodec(model, CODEC, f"q{quality}", device=device)

    register_codec(CODEC, loader)
    yield CODEC
    unregister_codec(CODEC)


def test_closest_quality_is_the_setting_with_the_nearest_file_size() -> None:
    pixels = _photo_like(np.random.default_rng(1), 64, 96)
    runs = evaluation._ClassicalRuns("x", pixels)
    jpeg = evaluation.CLASSICAL["jpeg"]
    sizes = {q: len(jpeg.encode(pixels, q)[0]) for q in range(1, 96)}
    for target in (sizes[3] - 1, sizes[40] + 7, sizes[90], 10, 10**6):
        chosen = runs.closest_quality(jpeg, 1, target)
        assert abs(sizes[chosen] - target) == min(abs(s - target) for s in sizes.values())


def test_closest_quality_finds_the_nearest_size_where_sizes_dip(monkeypatch) -> None:
    """WebP and JPEG XL sizes are not strictly monotone in quality: a bisection alone lands beside the dip."""
    codec = evaluation.CLASSICAL["webp"]
    sizes = {q: 1000 + 10 * q for q in range(0, 101)}
    sizes[54] = 1514  # a dip two qualities past the crossing (51: 1510, 52: 1520), exactly the target
    runs = evaluation._ClassicalRuns("x", np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(runs, "encoded", lambda c, q, f: (b"x" * sizes[q], 0.0))
    assert runs.closest_quality(codec, 1, 1514) == 54


def test_the_jpeg_anchor_has_optimised_huffman_tables_and_every_report_states_the_settings() -> None:
    """Pillow's default JPEG uses the standard tables: larger for the same pixels (3-108% on the test photos), a
    handicapped anchor."""
    pixels = _photo_like(np.random.default_rng(2), 128, 128)
    jpeg = evaluation.CLASSICAL["jpeg"]
    data, _ = jpeg.encode(pixels, 50)
    plain = io.BytesIO()
    Image.fromarray(pixels).save(plain, format="JPEG", quality=50)
    assert len(data) < len(plain.getvalue())
    decoded, _ = jpeg.decode(data, (128, 128))
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(plain.getvalue())).convert("RGB")))
    assert "optimize=True" in jpeg.settings() and "method=6" in evaluation.CLASSICAL["webp"].settings()
    evaluation_ = evaluation.Evaluation(["x"], [], [], [], classical_settings={"jpeg": jpeg.settings()})
    assert "jpeg: JPEG optimize=True" in evaluation.markdown_report(evaluation_)
    assert evaluation.Evaluation.from_dict(evaluation_.as_dict()).classical_settings == {"jpeg": jpeg.settings()}


def test_downscaled_codec_decodes_to_the_original_size() -> None:
    pixels = _photo_like(np.random.default_rng(2), 50, 70)
    codec = evaluation.CLASSICAL["webp-down"]
    full = len(codec.encode(pixels, 50, 1)[0])
    data, _ = codec.encode(pixels, 50, 3)
    decoded, _ = codec.decode(data, (70, 50))
    assert decoded.shape == (50, 70, 3) and len(data) < full


def test_matched_rows_of_a_downscaled_codec_name_the_factor() -> None:
    runs = evaluation._ClassicalRuns("x", _photo_like(np.random.default_rng(3), 96, 128))
    row = runs.matched(evaluation.CLASSICAL["avif-down"], 300)
    assert row.setting.split("x")[0] in {"2", "3", "4"} and row.bytes > 0 and 0 < row.ms_ssim <= 1


def test_shipped_ladder_is_every_quality_until_one_is_missing(two_quality_codec) -> None:
    notes = []
    ladder = evaluation.learned_ladder(two_quality_codec, note=notes.append)
    assert [p.label for p in ladder] == ["q1", "q2"]
    assert "ladder ends at quality 2" in notes[0]


def test_eval_codec_writes_json_markdown_and_plot(image_dir: Path, two_quality_codec, tmp_path: Path) -> None:
    out = tmp_path / "rd"
    assert main(["eval-codec", "--data", str(image_dir), "--codec", two_quality_codec, "--classical", "jpeg",
                 "webp", "--json", f"{out}.json", "--markdown", f"{out}.md", "--plot", f"{out}.png"]) == 0
    document = json.loads(Path(f"{out}.json").read_text())
    rows = document["rows"]
    assert [(r["image"], r["setting"]) for r in rows["learned"]] == [
        ("a.png", "q1"), ("a.png", "q2"), ("b.png", "q1"), ("b.png", "q2")]
    assert len(rows["matched"]) == 2 * 2 * 2  # images x ladder points x classical codecs
    assert {r["codec"] for r in rows["curves"]} == {"jpeg", "webp"}
    for row in rows["learned"]:
        assert row["bytes"] > 0 and row["bpp"] == pytest.approx(8 * row["bytes"] / (48 * 64))
    for row in rows["matched"]:
        assert row["target"].startswith(f"{two_quality_codec}:") and row["target_bytes"] > 0
    assert set(document["bd_rate_psnr_pchip"][two_quality_codec]) == {"jpeg", "webp"}
    bd_psnr = document["bd_psnr_db_pchip"][two_quality_codec]
    assert set(bd_psnr) == {"jpeg", "webp"}
    assert all(value is None or math.isfinite(value) for value in bd_psnr.values())
    report = Path(f"{out}.md").read_text()
    assert "BD-rate" in report and "BD-PSNR" in report
    assert Path(f"{out}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert document["machine"]["cpus"] >= 1
    assert sorted(p.name for p in tmp_path.glob("*rd*")) == ["rd.json", "rd.md", "rd.png"]  # no temp file left


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_existing_reports_are_kept_without_force_and_checked_before_the_evaluation(
        image_dir: Path, two_quality_codec, tmp_path: Path, capsys, monkeypatch, option) -> None:
    from effvision.codecs import evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before the output check"))
    kept = tmp_path / "kept.out"
    kept.write_text("a report of last week")
    base = ["eval-codec", "--data", str(image_dir), "--codec", two_quality_codec, "--classical", "jpeg"]
    assert main([*base, option, str(kept)]) == 1
    assert "--force" in capsys.readouterr().err and kept.read_text() == "a report of last week"
    assert main([*base, option, str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_the_plot_is_written_through_a_fresh_temp_name_not_a_planted_symlink(
        image_dir: Path, two_quality_codec, tmp_path: Path) -> None:
    """The plot went to the fixed name .NAME.tmp.png, following a symlink planted there."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".rd.png.tmp.png").symlink_to(victim)
    assert main(["eval-codec", "--data", str(image_dir), "--codec", two_quality_codec, "--classical", "jpeg",
                 "--plot", str(tmp_path / "rd.png")]) == 0
    assert victim.read_text() == "precious"
    assert (tmp_path / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learned_rows_come_from_real_evc_files(image_dir: Path, two_quality_codec) -> None:
    from effvision.codecs.base import load_codec
    from effvision.codecs.imagefile import encode_image

    point = evaluation.learned_ladder(two_quality_codec, qualities=[2])[0]
    image = Image.open(image_dir / "a.png")
    row = evaluation.run_learned(point, "a.png", image, evaluation._as_tensor(np.asarray(image)))
    assert row.bytes == len(encode_image(load_codec(two_quality_codec, quality=2), image).to_bytes())


def test_missing_jpeg_xl_plugin_skips_its_rows_with_a_note(monkeypatch) -> None:
    monkeypatch.setattr(evaluation, "jxl_available", lambda: False)
    notes = []
    codecs = evaluation.classical_codecs(["jpeg", "jxl"], notes.append)
    assert [c.name for c in codecs] == ["jpeg"]
    assert "pillow-jxl-plugin" in notes[0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--classical", "png"], "unknown classical codec(s) png"),
        (["--codec", "nosuchcodec"], "unknown codec nosuchcodec"),
        (["--codec", "mambaic", "vqgan", "--quality", "1"], "apply to one codec"),
        (["--quality", "9"], "quality 9"),
        (["--json", "/nonexistent-folder/x.json"], "does not exist"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(image_dir: Path, two_quality_codec, capsys, arguments,
                                                message) -> None:
    if arguments[:1] == ["--quality"]:
        arguments = ["--codec", two_quality_codec, *arguments]
    assert main(["eval-codec", "--data", str(image_dir), *arguments]) == 1
    assert message in capsys.readouterr().err


def test_folder_without_images_fails_cleanly(tmp_path: Path, capsys) -> None:
    assert main(["eval-codec", "--data", str(tmp_path)]) == 1
    assert "no image files" in capsys.readouterr().err


def test_ladder_panels_pair_each_real_file_with_the_jpeg_of_the_closest_size(two_quality_codec) -> None:
    image = Image.fromarray(_photo_like(np.random.default_rng(3), 64, 96))
    ladder = evaluation.learned_ladder(two_quality_codec, note=lambda line: None)
    panels = evaluation.ladder_panels(image, ladder, name="x")
    assert [p.label for p in panels] == ["q1", "q2"]
    runs = evaluation._ClassicalRuns("x", np.asarray(image))
    jpeg = evaluation.CLASSICAL["jpeg"]
    for panel in panels:
        assert panel.learned_image.size == panel.jpeg_image.size == image.size
        assert panel.learned.bytes > 0 and np.isfinite(panel.learned.psnr)
        sizes = {q: len(runs.encoded(jpeg, q, 1)[0]) for q in range(1, 96)}
        best = min(abs(size - panel.learned.bytes) for size in sizes.values())
        assert abs(panel.jpeg.bytes - panel.learned.bytes) == best
        reference = evaluation._as_tensor(np.asarray(image))
        assert panel.jpeg.psnr == pytest.approx(evaluation.psnr(reference, evaluation._as_tensor(
            np.asarray(panel.jpeg_image))))
    sheet = evaluation.ladder_picture(image, panels, title="t")
    assert sheet.size == (3 * 96, 14 + 2 * (64 + 14))
    # the original sits in the first column, the learned decodes above their JPEGs
    top = 14 + 14
    assert np.array_equal(np.asarray(sheet)[top : top + 64, :96], np.asarray(image))
    assert np.array_equal(np.asarray(sheet)[top : top + 64, 96:192], np.asarray(panels[0].learned_image))
    bottom = top + 64 + 14
    assert np.array_equal(np.asarray(sheet)[bottom : bottom + 64, 192:288], np.asarray(panels[1].jpeg_image))


def test_interpolated_summary_compares_at_exactly_the_learned_size_and_leaves_out_photos_outside_the_curve():
    def row(image, codec, setting, size, psnr):
        return evaluation.Row(image, codec, setting, size, 8 * size / 100, psnr, 0.9, 0.1, 0.1)

    curves = [row("a", "jpeg", "10", 100, 20.0), row("a", "jpeg", "50", 400, 30.0), row("a", "jpeg", "60", 500, 29.0),
              row("b", "jpeg", "10", 100, 25.0), row("b", "jpeg", "50", 400, 35.0)]
    learned = [row("a", "m", "q1", 200, 26.0), row("b", "m", "q1", 50, 40.0)]  # b: smaller than any JPEG
    result = evaluation.Evaluation(["a", "b"], learned, curves, [])
    (summary,) = result.interpolated_summary()
    # log-midpoint of 100 and 400 bytes is 200: JPEG's PSNR there is 25 dB; the 500-byte point is dominated
    assert summary["inside"] == 1 and summary["outside"] == 1 and summary["wins"] == 1
    assert summary["psnr_difference"] == pytest.approx(1.0)
    again = evaluation.Evaluation.from_dict(json.loads(json.dumps(result.as_dict())))
    assert again.interpolated_summary() == result.interpolated_summary()
    assert "| m:q1 | jpeg | 1/2 | +1.00 | 1/1 |" in evaluation.markdown_report(result)


def test_a_ladder_panel_knows_when_jpeg_cannot_make_a_file_that_small():
    def row(codec, size):
        return evaluation.Row("a", codec, "q1", size, 8 * size / 100, 30.0, 0.9, 0.1, 0.1)

    image = Image.new("RGB", (4, 4))
    tolerance = evaluation.MATCH_TOLERANCE
    close = evaluation.LadderPanel("q1", row("m", 1000), row("jpeg", int(1000 * (1 + tolerance))), image, image)
    larger = evaluation.LadderPanel("q1", row("m", 1000), row("jpeg", int(1000 * (1 + tolerance)) + 1), image, image)
    assert not close.jpeg_is_smallest and larger.jpeg_is_smallest


def test_tiny_images_evaluate_end_to_end_with_strict_json(tmp_path: Path, two_quality_codec) -> None:
    """A 3x9 and a flat 5x5 image: JPEG XL's search reaches its top quality, some classical decodes are lossless
    (PSNR inf). Before, pillow-jxl refused quality 100 and the BD fit failed on the infinite PSNR."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    Image.fromarray(_photo_like(np.random.default_rng(1), 3, 9)).save(folder / "strip.png")
    Image.fromarray(np.full((5, 5, 3), 128, np.uint8)).save(folder / "flat.png")
    out = tmp_path / "rd.json"
    assert main(["eval-codec", "--data", str(folder), "--codec", two_quality_codec, "--classical", "jpeg", "webp",
                 "jxl", "--json", str(out)]) == 0

    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    document = json.loads(out.read_text(), parse_constant=refuse)
    psnrs = [row["psnr"] for row in document["rows"]["curves"]]
    assert "inf" in psnrs  # the lossless decodes, written as strings
    again = evaluation.Evaluation.from_dict(document)
    assert math.inf in [row.psnr for row in again.curves]
    assert again.bd_rates() == evaluation.Evaluation.from_dict(json.loads(out.read_text())).bd_rates()
    assert any("single-scale SSIM" in line for line in document["notes"])  # its MS-SSIM is not the standard one


def test_an_image_too_small_for_ms_ssim_is_a_clear_error(tmp_path: Path, capsys) -> None:
    Image.fromarray(np.zeros((2, 7, 3), np.uint8)).save(tmp_path / "line.png")
    assert main(["eval-codec", "--data", str(tmp_path), "--classical", "jpeg"]) == 1
    assert "7x2 pixels" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 3x3"):
        evaluation.ms_ssim(torch.zeros(1, 3, 2, 7), torch.zeros(1, 3, 2, 7))


def test_bd_rate_leaves_out_lossless_points() -> None:
    anchor = [(0.1, 25.0), (0.2, 28.0), (0.4, 31.0), (0.8, 34.0)]
    test = [(0.1, 26.0), (0.2, 29.0), (0.4, 32.0)]
    expected = evaluation.bd_rate(anchor, test)
    assert evaluation.bd_rate([*anchor, (1.6, math.inf)], [*test, (0.5, math.nan)]) == pytest.approx(expected)


def test_the_images_held_for_the_evaluation_are_bounded_before_they_are_all_read(
        image_dir: Path, two_quality_codec, capsys, monkeypatch) -> None:
    """24 copies of a 187 kB 8000x8000 PNG took 5 GB before any work (MemoryError)."""
    from effvision import bounded_config

    monkeypatch.setattr(bounded_config, "physical_memory_bytes", lambda: 4 * (48 * 64 * 4 + 1))  # one RGB image fits
    assert main(["eval-codec", "--data", str(image_dir), "--codec", two_quality_codec, "--classical", "jpeg"]) == 1
    assert "passed at image 2 of 2" in capsys.readouterr().err


def test_eval_codec_measures_16_bit_and_transparent_images_as_encode_reads_them(
        tmp_path: Path, two_quality_codec, capsys) -> None:
    """eval-codec took ``convert("RGB")`` of the file as opened: a 16-bit grey PNG clipped to near-white, and
    alpha dropped instead of composited onto white, so its figures were of another image than encode codes.
    A transparent image is measured on white and said to be: encode's .evc adds its alpha (up to 23% more bytes
    without a word)."""
    rng = np.random.default_rng(1)
    grey = _photo_like(rng)[..., 0]
    alpha = rng.integers(0, 256, grey.shape, dtype=np.uint8)
    twins = {"8-bit": tmp_path / "eight", "16-bit": tmp_path / "sixteen"}
    for folder in twins.values():
        folder.mkdir()
    Image.fromarray(grey).save(twins["8-bit"] / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(twins["16-bit"] / "grey.png")  # the same picture
    rgba = np.dstack([np.repeat(grey[..., None], 3, axis=2), alpha])
    Image.fromarray(rgba, "RGBA").save(twins["16-bit"] / "rgba.png")
    on_white = (grey.astype(np.float32) * alpha + 255.0 * (255 - alpha)) / 255.0
    Image.fromarray(np.repeat(np.rint(on_white).astype(np.uint8)[..., None], 3, axis=2)).save(
        twins["8-bit"] / "rgba.png")
    rows = {}
    for label, folder in twins.items():
        out = tmp_path / f"{label}.json"
        assert main(["eval-codec", "--data", str(folder), "--codec", two_quality_codec, "--classical", "jpeg",
                     "--json", str(out)]) == 0
        learned = json.loads(out.read_text())["rows"]["learned"]
        rows[label] = [(r["image"], r["bytes"], round(r["psnr"], 2)) for r in learned]
        said = "note: 1 of 2 images have transparency" in capsys.readouterr().err
        assert said == (label == "16-bit")  # the folder with the RGBA file
    assert rows["16-bit"] == rows["8-bit"]


def test_outputs_that_are_an_input_or_each_other_are_refused_before_the_evaluation(
        image_dir: Path, two_quality_codec, tmp_path: Path, capsys, monkeypatch) -> None:
    """--json onto an input photo with --force replaced the photo; --json and --markdown naming one file
    failed after the whole evaluation (or, with --force, the markdown replaced the JSON); --json - mixed the
    JSON into the report on standard output."""
    from effvision.codecs import evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated before the output check"))
    photo = image_dir / "a.png"
    before = photo.read_bytes()
    base = ["eval-codec", "--data", str(image_dir), "--codec", two_quality_codec, "--classical", "jpeg", "--force"]
    for options, message in (
        (["--json", str(photo)], "is one of the inputs"),
        (["--json", str(tmp_path / "r.out"), "--markdown", str(tmp_path / "r.out")], "name the same file"),
        (["--json", "-"], "--json writes a file"),
        (["--plot", str(tmp_path / "rd.gif")], "plots are written as .png, .svg, .pdf"),
    ):
        assert main([*base, *options]) == 1
        assert message in capsys.readouterr().err
    assert photo.read_bytes() == before and not (tmp_path / "r.out").exists()


def test_photos_of_one_name_in_two_subfolders_are_two_images_and_repeats_count_once(
        tmp_path: Path, two_quality_codec) -> None:
    """Images were keyed by file name: a/x.png and b/x.png merged into one row set (the matched table then
    mixed their numbers); --quality 1 1 evaluated the point twice and counted it as two images."""
    rng = np.random.default_rng(1)
    for folder in ("a", "b"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.fromarray(_photo_like(rng)).save(tmp_path / "data" / folder / "x.png")
    out = tmp_path / "rd.json"
    assert main(["eval-codec", "--data", str(tmp_path / "data"), "--codec", two_quality_codec, "--quality", "1", "1",
                 "--effort", "0", "0", "--classical", "jpeg", "--json", str(out), "--plot",
                 str(tmp_path / "rd.svg")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["image"], r["setting"]) for r in rows["learned"]] == [("a/x.png", "q1"), ("b/x.png", "q1")]
    assert b"<svg" in (tmp_path / "rd.svg").read_bytes()[:400]


def test_a_one_point_ladder_is_marked_and_the_runs_notes_are_in_the_report() -> None:
    """A one-point "BD-rate" is a difference at that point's rate, not a Bjøntegaard mean: the report says so."""
    curve = [evaluation.Row("x", "jpeg", str(q), b, 8 * b / 4096, p, 0.9, 0.0, 0.0)
             for q, b, p in ((10, 300, 25.0), (50, 900, 31.0), (90, 2400, 38.0))]
    point = [evaluation.Row("x", "learned", "q1", 600, 8 * 600 / 4096, 29.0, 0.9, 0.0, 0.0)]
    report = evaluation.markdown_report(evaluation.Evaluation(["x"], point, curve, [], ["note: ladder ends at 1"]))
    assert "| learned (one point) |" in report and "has no Bjøntegaard mean" in report
    assert "note: ladder ends at 1" in report
