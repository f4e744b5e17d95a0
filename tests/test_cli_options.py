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


def test_an_error_naming_a_file_with_control_characters_stays_one_escaped_line(tmp_path, capsys):
    """A file name holding a newline split the error line, and a terminal escape sequence reached the terminal."""
    name = tmp_path / "photo\n\x1b]0;title\x07red.png"  # a newline, and the escape that sets a window title
    name.write_bytes(b"not an image")
    assert main(["encode", str(name), "-o", str(tmp_path / "x.evc")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "photo\\n\\x1b]0;title\\x07red.png" in err
