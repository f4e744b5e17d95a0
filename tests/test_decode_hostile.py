"""Hostile .evc files with valid checksums, decoded by the CLI in a child process with capped memory.

Each file is made from a fresh encode with the shipped weights (see tests/hostile_files.py). The CLI must end
every one in exit status 0 or 1 (never a signal, hang or traceback) and a file that decodes must give the same
pixels in two separate processes.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.hostile_files import hostile_variants

#: address-space cap of the child: torch and compressai map ~3.5 GB of virtual memory at import, so this
#: leaves the decoder about 2.5 GB.
ADDRESS_SPACE = 6 * 2**30
TIMEOUT_S = 240
VALID = ("v1-valid",)


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_decode(files: list[Path], out_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "effvision", "decode", *map(str, files), "-o", str(out_dir), "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=_cap_memory, env=environment
    )


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    from skimage import data

    from effvision.codecs.base import load_codec
    from effvision.codecs.imagefile import encode_image

    photo = data.astronaut()
    rgb = Image.fromarray(photo[100:164, 180:244])
    rgba = Image.fromarray(np.dstack([photo[:24, :20], np.arange(480, dtype=np.uint8).reshape(24, 20)]), "RGBA")
    mambaic = load_codec("mambaic", device="cpu")
    vqgan = load_codec("vqgan", device="cpu")
    vqgan.compress_kwargs = {**vqgan.compress_kwargs, "chunks": 2}  # two index bands, then the colour band
    directory = tmp_path_factory.mktemp("hostile")
    files = hostile_variants(encode_image(mambaic, rgb), encode_image(vqgan, rgb), encode_image(mambaic, rgba))
    for name, container in files.items():
        (directory / f"{name}.evc").write_bytes(container.to_bytes())
    return directory


def test_every_hostile_file_ends_in_a_clean_error_or_the_same_pixels_twice(hostile_dir, tmp_path):
    files = sorted(hostile_dir.glob("*.evc"))
    assert len(files) > 40
    runs = [run_decode(files, tmp_path / f"run{i}") for i in range(2)]
    for result in runs:
        assert result.returncode == 1, result.stderr  # some inputs fail, so the batch exits 1, not by a signal
        assert "Traceback" not in result.stderr
    decoded = sorted(p.stem for p in (tmp_path / "run0").glob("*.png"))
    for name in VALID:
        assert name in decoded, runs[0].stderr
    for path in files:
        reported = [line for line in runs[0].stderr.splitlines() if str(path) in line and "error" in line]
        assert (path.stem in decoded) != bool(reported), f"{path.stem}: decoded={path.stem in decoded} {reported}"
    for name in decoded:
        first = np.asarray(Image.open(tmp_path / "run0" / f"{name}.png"))
        second = np.asarray(Image.open(tmp_path / "run1" / f"{name}.png"))
        assert np.array_equal(first, second), name
    assert sorted(p.stem for p in (tmp_path / "run1").glob("*.png")) == decoded


def test_large_declared_sizes_are_refused_before_any_decoding(hostile_dir, tmp_path):
    names = ["v2-2048x2048-from-64x64-streams", "v1-8192x8192", "vqgan-lost-v1-8192x8192", "v1-shape-rank4",
             "v2-77x77-one-pixel-tiles", "vqgan-v2-64x64-one-pixel-tiles"]
    result = run_decode([hostile_dir / f"{name}.evc" for name in names], tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == len(names), result.stderr
    assert not list((tmp_path / "out").glob("*.png"))


def test_colour_band_damage_is_refused_and_a_lost_band_still_decodes(hostile_dir, tmp_path):
    refused = ["vqgan-colour-cut4", "vqgan-colour-header-only", "vqgan-colour-v2-2048x2048",
               "vqgan-colour-flags-disagree"]
    names = ["vqgan-colour-lost", *refused]
    result = run_decode([hostile_dir / f"{name}.evc" for name in names], tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == ["vqgan-colour-lost"], result.stderr
    for name in refused:
        assert any(name in line and "error" in line for line in result.stderr.splitlines()), (name, result.stderr)
