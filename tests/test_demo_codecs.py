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
