"""Crafted pickles in torch.save archives whose unpickling would crash or hang are refused before any unpickler
runs (effvision.pickle_scan), while real checkpoints still load."""

from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path

import pytest
import torch

from effvision.errors import UserError
from effvision.pickle_scan import check_pickle_cost
from effvision.torch_checkpoint import load_torch_checkpoint
from effvision.training import load_training_state


def archive(path: Path, pickled: bytes) -> Path:
    """A torch.save-like zip (stored records) holding ``pickled`` as its data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        out.writestr("archive/data.pkl", pickled)
        out.writestr("archive/version", "3\n")
    return path


def deep_tuple_key(depth: int) -> bytes:
    """{((...(1,)...),): 1}: hashing the key recursed ``depth`` deep in C (a segfault at 300,000)."""
    return b"\x80\x02}K\x01" + b"\x85" * depth + b"K\x01s."


def shared_tuples(levels: int) -> bytes:
    """t_i = (t_{i-1}, t_{i-1}) through memo references: 2^levels tuples when hashed or printed, from ~25 bytes a
    level (993 bytes at 40 levels hung the loader in a hash that ignored SIGTERM)."""
    body = b")q\x000"  # EMPTY_TUPLE, BINPUT 0, POP
    for level in range(1, levels + 1):  # BINGET, BINGET, TUPLE2, BINPUT, POP
        body += b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"\x86q" + bytes([level]) + b"0"
    return b"\x80\x02}" + body + b"h" + bytes([levels]) + b"K\x01s."


def binunicode(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def hex_doubling(calls: int) -> bytes:
    """31 chained ``_codecs.encode(x, "hex")`` made 4.7 GB from a few hundred bytes."""
    pickled = b"\x80\x02c_codecs\nencode\nq\x00" + binunicode("a") + binunicode("latin1") + b"\x86Rq\x01"
    for call in range(calls):
        pickled += b"h\x00h" + bytes([call + 1]) + binunicode("hex") + b"\x86Rq" + bytes([call + 2])
    return pickled + b"."


def rehashed(copies: int) -> bytes:
    """One shared value of 2^20 parts as the key of ``copies`` fresh dicts: each hashes it again (200,000 copies
    of a 2^22 one took hours)."""
    body = b")q\x000"
    for level in range(1, 21):
        body += b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"\x86q" + bytes([level]) + b"0"
    return b"\x80\x02]" + body + b"(" + b"}h\x14K\x01s" * copies + b"e."


@pytest.mark.parametrize("pickled, message", [
    (deep_tuple_key(300_000), "nests values more than 100 deep"),
    (deep_tuple_key(20_000), "nests values more than 100 deep"),
    (shared_tuples(40), "more than 16777216 parts"),
    # A = [], B = (A, A), then A.append(1): a value grown after a reference to it was counted
    (b"\x80\x02]q\x00h\x00h\x00\x86q\x010K\x01a.", "changes a value after sharing it"),
    (b"\x80\x02}K\x01", "malformed"),
    (b"\x80\x02\xff.", "malformed"),
    (hex_doubling(31), "_codecs.encode with another encoding than latin1"),
    (rehashed(100), "more than 67108864 parts in all"),
    (b"\x80\x02Kxr\x00\x00\x00\x10.", "memo entry 268435456 after 2 opcodes"),  # the C memo array: 2 GB
    # 1024 references to a 1 MiB string in a persistent id: a 1 GiB repr in torch's error message
    (b"\x80\x02" + binunicode("A" * (1 << 20)) + b"q\x00(" + b"h\x00" * 1024 + b"tQ.", "more than 16777216 parts"),
    # a long string as the callable / as a global name: torch searched the error message with a quadratic regex
    (b"\x80\x02" + binunicode("A" * 40_000) + b")R.", r"calls \(REDUCE\) something that is not a named global"),
    (b"\x80\x02c" + b"A" * 40_000 + b"\nB\n)R.", "names a global 'AAAA"),
])
def test_a_crafted_pickle_is_refused_at_once_by_every_loader(tmp_path, pickled, message):
    path = archive(tmp_path / "crafted.pth", pickled)
    for load in (load_torch_checkpoint, load_training_state):
        started = time.monotonic()
        with pytest.raises(UserError, match=message):
            load(path)
        assert time.monotonic() - started < 5


def test_real_checkpoints_and_their_shared_parts_pass():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight = model[0].bias  # a tied (shared) parameter
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    shared = {"a": 1}
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "args": [shared, shared, (1, 2)]}
    check_pickle_cost(pickle.dumps(payload, protocol=2), "test")
    check_pickle_cost(shared_tuples(20), "test")  # a million parts: a bound no checkpoint comes near, not a cap on it


def test_a_saved_checkpoint_still_loads(tmp_path):
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "step": 4, "settings": {"lr": 1e-4, "crop": (32, 32)}}
    torch.save(state, tmp_path / "state.pt")
    loaded = load_torch_checkpoint(tmp_path / "state.pt")
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["weight"], state["model"]["weight"])


def test_a_loader_error_is_one_bounded_line(tmp_path):
    """A storage named by a 1 MB key: torch's error echoed it whole (a 4 MB line from a 4 MB key), and the
    training-state loader printed torch's six lines advising ``weights_only=False``."""
    key = b"A" * (1 << 20)
    pickled = (b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX" + len(key).to_bytes(4, "little") + key
               + b"X\x03\x00\x00\x00cpuK\x01tQ.")
    path = archive(tmp_path / "long.pth", pickled)
    for load in (load_torch_checkpoint, load_training_state):
        with pytest.raises(UserError) as raised:
            load(path)
        message = str(raised.value)
        assert len(message) < 600 and "\n" not in message and "weights_only" not in message


def test_an_archive_whose_readers_would_disagree_is_refused(tmp_path):
    """Two central directories of one size: Python's zipfile (and so the scan) read a harmless data.pkl, torch's
    reader the 300,000-deep one, and the load segfaulted."""
    import struct
    import zlib

    def local(name: bytes, data: bytes) -> bytes:
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, zlib.crc32(data), len(data), len(data),
                           len(name), 0) + name + data

    def central(name: bytes, data: bytes, offset: int) -> bytes:
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, zlib.crc32(data), len(data),
                           len(data), len(name), 0, 0, 0, 0, 0, offset) + name

    name, evil, benign = b"archive/data.pkl", deep_tuple_key(300_000), b"\x80\x02}q\x00."
    out = bytearray(local(name, evil))
    benign_at = len(out)
    out += local(name, benign)
    torch_directory = central(name, evil, 0)
    zipfile_directory = central(name, benign, benign_at - len(torch_directory))
    start = len(out)
    out += torch_directory + zipfile_directory
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(zipfile_directory), start, 0)
    path = tmp_path / "two-directories.pth"
    path.write_bytes(bytes(out))
    assert zipfile.ZipFile(path).read(name.decode()) == benign  # what the scan would have read
    with pytest.raises(UserError, match="central directory is not where its end record says"):
        load_torch_checkpoint(path)


def test_protocol_2_builtins_load_through_the_allow_list(tmp_path):
    """Protocol 2 names ``frozenset`` ``__builtin__.frozenset``; the allow list refused it."""
    torch.save({"classes": frozenset({1, 2}), "weight": torch.zeros(2)}, tmp_path / "f.pth", pickle_protocol=2)
    assert load_torch_checkpoint(tmp_path / "f.pth")["classes"] == frozenset({1, 2})
