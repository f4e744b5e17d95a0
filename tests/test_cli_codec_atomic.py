"""Atomic writes: a failure mid-write leaves no partial output and never touches an existing file."""

import os
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from effvision.codecs.base import ImageCodec, register_codec, unregister_codec
from effvision.errors import UserError
from effvision.io_utils import atomic_path, atomic_write, atomic_write_bytes, output_paths, read_bytes


class WriteFailure(Exception):
    pass


def failing_writer(handle):
    handle.write(b"partial data")
    raise WriteFailure("disk full")


def test_failure_mid_write_leaves_no_output(tmp_path):
    with pytest.raises(WriteFailure):
        atomic_write(tmp_path / "out.evc", failing_writer)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_keeps_the_existing_file(tmp_path):
    (tmp_path / "out.evc").write_bytes(b"original")
    with pytest.raises(WriteFailure):
        atomic_write(tmp_path / "out.evc", failing_writer, force=True)
    assert (tmp_path / "out.evc").read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["out.evc"]


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "model.bin"  # the folder is created
    with atomic_path(target) as temp:
        Path(temp).write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(WriteFailure), atomic_path(target) as temp:
        Path(temp).write_bytes(b"partial")
        raise WriteFailure("disk full")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["model.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_ordinary_permissions_not_owner_only(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.evc", b"x")
        with atomic_path(tmp_path / "b.safetensors") as temp:
            Path(temp).write_bytes(b"y")
        with atomic_path(tmp_path / "c.safetensors") as temp:  # a writer that replaces the file, 0600
            Path(temp).unlink()
            os.close(os.open(temp, os.O_CREAT | os.O_WRONLY, 0o600))
        import torch
        from safetensors.torch import save_file

        with atomic_path(tmp_path / "d.safetensors") as temp:
            save_file({"w": torch.zeros(2)}, temp)
    finally:
        os.umask(previous)
    for name in ("a.evc", "b.safetensors", "c.safetensors", "d.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_failing_fsync_leaves_no_output(tmp_path, monkeypatch):
    def broken_fsync(descriptor):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(UserError, match=r"cannot write .*out\.evc: I/O error"):
        atomic_write_bytes(tmp_path / "out.evc", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_failing_rename_keeps_the_existing_file(tmp_path, monkeypatch):
    (tmp_path / "out.evc").write_bytes(b"original")

    def broken_replace(source, destination):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(UserError, match="rename failed"):
        atomic_write_bytes(tmp_path / "out.evc", b"new", force=True)
    assert (tmp_path / "out.evc").read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["out.evc"]


@pytest.mark.parametrize("write", ["atomic_write_bytes", "atomic_path"])
def test_unwritable_folder_error_names_the_destination_not_the_temporary_file(tmp_path, monkeypatch, write):
    def refused(prefix, suffix, dir):
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}abc{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(UserError) as error:
        if write == "atomic_write_bytes":
            atomic_write_bytes(tmp_path / "out.evc", b"x")
        else:
            with atomic_path(tmp_path / "out.evc"):
                pass
    assert str(error.value) == f"cannot write {tmp_path / 'out.evc'}: Permission denied"
    assert list(tmp_path.iterdir()) == []


def test_existing_file_without_force_is_a_user_error(tmp_path):
    (tmp_path / "out.evc").write_bytes(b"original")
    with pytest.raises(UserError, match="exists"):
        atomic_write_bytes(tmp_path / "out.evc", b"new")
    assert (tmp_path / "out.evc").read_bytes() == b"original"


def test_file_created_during_the_write_is_not_clobbered(tmp_path):
    def racing_writer(handle):
        (tmp_path / "out.evc").write_bytes(b"other process")
        handle.write(b"mine")

    with pytest.raises(UserError, match="exists"):
        atomic_write(tmp_path / "out.evc", racing_writer)
    assert (tmp_path / "out.evc").read_bytes() == b"other process"
    assert [p.name for p in tmp_path.iterdir()] == ["out.evc"]


def test_a_device_pipe_or_socket_is_never_replaced_even_with_force(tmp_path):
    """Moving a file into place replaces the entry itself: ``export ... /dev/null --force`` run as root turned
    the null device into a plain file for every process on the machine. A FIFO stands in for the device."""
    import stat

    from effvision.io_utils import check_not_existing, check_output_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for check in (lambda: check_output_file(fifo, True), lambda: check_not_existing(str(fifo), True),
                  lambda: atomic_write_bytes(fifo, b"new", force=True)):
        with pytest.raises(UserError, match="not a regular file"):
            check()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    (tmp_path / "file").write_bytes(b"old")  # a regular file and a link are still replaced with force
    os.symlink(tmp_path / "file", tmp_path / "link")
    atomic_write_bytes(tmp_path / "file", b"new", force=True)
    atomic_write_bytes(tmp_path / "link", b"linked", force=True)
    assert (tmp_path / "file").read_bytes() == b"new" and (tmp_path / "link").read_bytes() == b"linked"


def test_successful_write_has_the_exact_bytes(tmp_path):
    atomic_write_bytes(tmp_path / "out.evc", b"complete")
    assert (tmp_path / "out.evc").read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out.evc"]


class ConstantCodec(ImageCodec):
    name, config_id, alignment = "constant-test", "", 1

    def fingerprint(self) -> bytes:
        return b""

    def encode(self, image):
        return [b"\x00" * 64]

    def decode(self, sections, height, width):
        return torch.zeros(3, height, width)


def test_interrupted_cli_encode_leaves_no_output_and_keeps_existing(tmp_path, monkeypatch):
    from effvision import cli

    monkeypatch.setattr(cli, "COMMANDS", {"encode": "encode"})
    register_codec("constant-test", lambda **_: ConstantCodec(), overwrite=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "b.evc").write_bytes(b"original")

    def interrupted_fsync(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    for name in ("a", "b"):
        argv = ["encode", str(tmp_path / f"{name}.png"), "--codec", "constant-test", "--force"]
        assert cli.main(argv) == 130
    unregister_codec("constant-test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.evc", "b.png"]
    assert (tmp_path / "b.evc").read_bytes() == b"original"


def test_two_inputs_with_the_same_name_are_refused(tmp_path):
    with pytest.raises(UserError, match="several inputs"):
        output_paths(["a/x.png", "b/x.png"], str(tmp_path / "out"), ".evc")


def test_a_directory_input_with_one_file_writes_into_the_output_directory(tmp_path):
    (tmp_path / "in").mkdir()
    destinations = output_paths(["in/a.png"], str(tmp_path / "out"), ".evc", [str(tmp_path / "in")])
    assert destinations == [str(tmp_path / "out" / "a.evc")] and (tmp_path / "out").is_dir()


def test_read_bytes_names_what_is_wrong_and_never_blocks(tmp_path):
    fifo = tmp_path / "pipe.evc"
    os.mkfifo(fifo)  # reading would wait for a writer forever
    with pytest.raises(UserError, match="pipe.evc: not a regular file"):
        read_bytes(fifo, 100)
    with pytest.raises(UserError, match="not a regular file"):
        read_bytes(tmp_path, 100)
    with pytest.raises(UserError, match="gone.evc: no such file"):
        read_bytes(tmp_path / "gone.evc", 100)
    (tmp_path / "big.evc").write_bytes(b"x" * 101)
    with pytest.raises(UserError, match="larger than 100 bytes"):
        read_bytes(tmp_path / "big.evc", 100)
    assert read_bytes(tmp_path / "big.evc", 101) == b"x" * 101
