"""Thousands of mutated .evc files (valid checksums) through the decoder, in two memory-capped child processes.

tests/fuzz_decode.py makes the mutants from fresh encodes and records each outcome. The first process decodes all of
them; the second regenerates the same mutants and decodes afresh every one that decoded plus every tenth that
failed. Both must exit normally (a crash or a read past a buffer would kill them or change pixels), and every
outcome must agree between the two processes.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

MUTANTS = 2500
ADDRESS_SPACE = 6 * 2**30  # torch maps ~3.5 GB at import; the decoder gets the rest
TIMEOUT_S = 400
ROOT = Path(__file__).resolve().parents[1]


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_fuzzer(out: Path, *extra: str) -> dict:
    command = [sys.executable, "-W", "ignore", "-m", "tests.fuzz_decode", str(out), "--count", str(MUTANTS), *extra]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        preexec_fn=_cap_memory,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, f"fuzzer exited with {result.returncode}: {result.stderr[-2000:]}"
    return json.loads(out.read_text())


def test_mutants_end_in_errors_or_the_same_pixels_in_two_processes(tmp_path):
    first = run_fuzzer(tmp_path / "first.json", "--memo")
    outcomes = first["outcomes"]
    assert len(outcomes) == MUTANTS
    kinds = collections.Counter("decoded" if not o.startswith("error:") else o for o in outcomes.values())
    assert kinds["decoded"] > 0 and kinds["error:ContainerError"] > 0 and kinds["error:UserError"] > 0, kinds
    assert set(kinds) <= {
        "decoded",
        "error:ContainerError",
        "error:UserError",
        "error:CorruptStreamError",
        "error:ResourceError",
        "error:codec",
    }, kinds
    recheck = sorted(int(n) for n, o in outcomes.items() if not o.startswith("error:") or int(n) % 10 == 0)
    second = run_fuzzer(tmp_path / "second.json", "--memo", "--only", json.dumps(recheck))
    assert second["originals"] == first["originals"]
    assert sorted(int(n) for n in second["outcomes"]) == recheck
    disagreements = [n for n, o in second["outcomes"].items() if outcomes[n] != o]
    assert not disagreements, disagreements[:10]
