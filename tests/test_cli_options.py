"""Numeric options of the CLI commands are bounded by argparse: one usage line, exit status 2."""

import pytest

from effvision.cli import main


@pytest.mark.parametrize(("arguments", "message"), [
    (["encode", "x.png", "--effort", "100000000000"], "--effort: must be from 0 to 1000"),  # ran ~23M hours
    (["eval-codec", "--data", "d", "--effort", "0", "1001"], "--effort: must be from 0 to 1000"),
    (["demo", "--repeats", "0"], "--repeats: must be from 1 to 1000"),
    (["train-codec", "--data", "d", "--seed", "99999999999999999999999"], "--seed: must be from 0 to"),  # overflow
    (["train-vqgan", "d", "-o", "x.safetensors", "--seed", "-1"], "--seed: must be from 0 to"),
    (["finetune", "d", "--model", "m", "--seed", "1e3"], "--seed: invalid integer '1e3'"),
])
def test_numeric_options_out_of_range_are_usage_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
