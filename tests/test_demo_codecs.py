"""``effvision demo``'s codec part: every shipped quality of each codec beside JPEG, and the ladder picture."""

from __future__ import annotations

import torch
from PIL import Image

from effvision.codecs import mambaic
from effvision.commands.demo import run_codecs

torch.set_num_threads(1)


def test_demo_prints_each_shipped_quality_and_writes_the_ladder_picture(tmp_path, capsys):
    output = tmp_path / "ladder.png"
    run_codecs(output, force=False)
    printed = capsys.readouterr().out
    qualities = mambaic.qualities()
    for quality in qualities:
        assert f"mambaic  q{quality} " in printed
    for quality in (1, 2, 3, 4):
        assert f"vqgan    q{quality} " in printed
    with Image.open(output) as sheet:
        assert sheet.size == ((1 + len(qualities) + 4) * 256, 2 * (256 + 14))


def test_demo_refuses_a_bad_output_or_a_huge_batch_before_any_work(tmp_path, capsys):
    """Before: a missing folder failed after the timing (about 18 s), and --batch 100000 asked for 60 GB."""
    import time

    from effvision.cli import main

    started = time.perf_counter()
    assert main(["demo", "-o", str(tmp_path / "nowhere" / "x.png")]) == 1
    assert "its folder does not exist" in capsys.readouterr().err
    assert main(["demo", "--batch", "100000", "-o", str(tmp_path / "x.png")]) == 1
    assert "a batch of 100000 images" in capsys.readouterr().err
    assert time.perf_counter() - started < 10  # no model was built or timed
