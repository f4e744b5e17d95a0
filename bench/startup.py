"""Start-up cost of the command line: wall and CPU time of fresh processes, against ``import torch``.

Each case is a new Python process, run ``--repeats`` times; the cases alternate within each repeat (round
robin), so load from other users of a shared machine hits every case alike. Reported: the median wall time
and the median CPU time (user + system of the child; less sensitive to other load than wall time).

Targets (issue 11): decoding a tiny ``.evc`` costs at most 2x ``python -c "import torch"``, a missing file
at most 1x. The tiny file is a 32x32 image encoded with the shipped MambaIC weights.

    .venv/bin/python bench/startup.py --repeats 7 --out bench/results/startup-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from effvision.io_utils import atomic_write_bytes


def effvision_command() -> list[str]:
    script = Path(sys.executable).with_name("effvision")
    return [str(script)] if script.exists() else [sys.executable, "-m", "effvision"]


def tiny_png(path: Path) -> None:
    """A 32x32 RGB gradient PNG written with the standard library (this script imports no image library)."""
    rows = b"".join(b"\x00" + bytes(v for x in range(32) for v in (x * 8, y * 8, (x + y) * 4)) for y in range(32))
    header = (32).to_bytes(4, "big") * 2 + bytes((8, 2, 0, 0, 0))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) +
                     chunk(b"IEND", b""))


def cases(folder: Path) -> dict[str, list[str]]:
    cli = effvision_command()
    python = [sys.executable, "-c"]
    return {
        "python -c pass": [*python, "pass"],
        'python -c "import torch"': [*python, "import torch"],
        'python -c "import compressai"': [*python, "import compressai"],
        'python -c "import effvision"': [*python, "import effvision"],
        "effvision --help": [*cli, "--help"],
        "effvision decode missing.evc": [*cli, "decode", str(folder / "missing.evc")],
        "effvision decode tiny.evc (32x32, mambaic)": [
            *cli, "decode", str(folder / "tiny.evc"), "-o", str(folder / "out.png"), "--force", "--device", "cpu"],
    }


# One decode in a fresh process, timed phase by phase (wall and process CPU time after each step).
DECODE_PHASES = """
import json, sys, time
marks = [("start", time.perf_counter(), time.process_time())]
def mark(name):
    marks.append((name, time.perf_counter(), time.process_time()))
import torch
mark("import torch")
import compressai
mark("import compressai")
from effvision.codecs.base import load_codec
from effvision.codecs.container import parse
from effvision.codecs.imagefile import decode_image
mark("import effvision codec modules")
with open(sys.argv[1], "rb") as handle:
    container = parse(handle.read())
codec = load_codec(container.codec, device="cpu", config_id=container.config_id)
mark("build codec + load weights")
with torch.no_grad():
    decode_image(container, codec)
mark("decode (fingerprint check, entropy decoding, synthesis)")
print(json.dumps([[name, wall - marks[i][1], cpu - marks[i][2]] for i, (name, wall, cpu) in enumerate(marks[1:])]))
"""


def decode_phases(evc: Path) -> list[tuple[str, float, float]]:
    result = subprocess.run([sys.executable, "-c", DECODE_PHASES, str(evc)], capture_output=True, text=True,
                            check=True)
    return [tuple(row) for row in json.loads(result.stdout.strip().splitlines()[-1])]


def run_once(command: list[str], expect_success: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if (result.returncode == 0) != expect_success:
        raise RuntimeError(f"{command} exited {result.returncode}: {result.stderr.decode()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model}, {os.cpu_count()} CPU cores visible, possibly shared with other jobs (see the load "
            f"averages); Python {platform.python_version()}, {platform.system()}")


def _notes(results: dict, phases: dict) -> str:
    """What the numbers say, computed from them (CPU time relative to ``import torch``)."""
    torch_cpu = results['python -c "import torch"']["median_cpu_s"]
    compressai = phases["import compressai"]["median_cpu_s"] / torch_cpu
    model = sum(phases[name]["median_cpu_s"] for name in phases if name.startswith(("build", "decode"))) / torch_cpu
    tiny = results["effvision decode tiny.evc (32x32, mambaic)"]["median_cpu_s"]
    verdict = "met" if tiny <= 2 * torch_cpu else "not met"
    return (
        "`effvision --help`, usage errors and cheap failures (missing file, bad magic, truncated container, "
        "unsupported output suffix) import neither torch nor timm; the decode path imports torch, compressai "
        "and effvision's codec modules only (no timm), and decodes small images on one torch thread. What remains "
        f"above `import torch` on the decode path: compressai's own `__init__` ({compressai:.1f}x `import torch` "
        "of CPU time: it imports torchvision -> torch._dynamo, scipy.stats and, for its point-cloud datasets, "
        "torch_geometric; every compressai release imports torchvision and scipy.stats, and we do not patch "
        f"compressai's import), then building the codec, loading its weights and decoding ({model:.1f}x together). "
        f"The 2x target is {verdict} on this machine."
    )


def to_markdown(report: dict) -> str:
    torch_wall = report["results"]['python -c "import torch"']["median_wall_s"]
    torch_cpu = report["results"]['python -c "import torch"']["median_cpu_s"]
    lines = [
        "# CLI start-up (bench/startup.py)",
        "",
        f"Machine: {report['machine']}.",
        f"Median of {report['repeats']} fresh processes per case, cases alternating; load average "
        f"{report['load_before']} before, {report['load_after']} after.",
        "",
        "| case | median wall s | x import torch | median CPU s | x import torch |",
        "|---|---|---|---|---|",
    ]
    for name, result in report["results"].items():
        lines.append(f"| `{name}` | {result['median_wall_s']:.2f} | {result['median_wall_s'] / torch_wall:.2f} | "
                     f"{result['median_cpu_s']:.2f} | {result['median_cpu_s'] / torch_cpu:.2f} |")
    lines += [
        "",
        "Where a tiny decode's time goes (one fresh process per repeat, phase by phase, medians):",
        "",
        "| phase | median wall s | median CPU s |",
        "|---|---|---|",
    ]
    for name, phase in report["decode_phases"].items():
        lines.append(f"| {name} | {phase['median_wall_s']:.2f} | {phase['median_cpu_s']:.2f} |")
    targets = report["targets"]
    lines += [
        "",
        f"Targets: decoding the tiny file {targets['decode_tiny_vs_torch_wall']:.2f}x `import torch` in wall time "
        f"({targets['decode_tiny_vs_torch_cpu']:.2f}x in CPU time; target <= 2x), a missing file "
        f"{targets['missing_vs_torch_wall']:.2f}x (target <= 1x).",
        "",
        report["notes"],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup-cpu"))
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    folder = Path(tempfile.mkdtemp(prefix="effvision-startup-"))
    try:
        tiny_png(folder / "tiny.png")
        run_once([*effvision_command(), "encode", str(folder / "tiny.png"), "-o", str(folder / "tiny.evc"),
                  "--device", "cpu"], expect_success=True)
        commands = cases(folder)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        phases: list[list[tuple[str, float, float]]] = []
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(run_once(command, expect_success="missing" not in name))
            phases.append(decode_phases(folder / "tiny.evc"))
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = {
        name: {
            "command": " ".join(Path(part).name if part == sys.executable else part for part in commands[name]),
            "wall_s": [round(wall, 3) for wall, _ in runs],
            "cpu_s": [round(cpu, 3) for _, cpu in runs],
            "median_wall_s": statistics.median(wall for wall, _ in runs),
            "median_cpu_s": statistics.median(cpu for _, cpu in runs),
        }
        for name, runs in times.items()
    }

    def ratio(name: str, key: str) -> float:
        return results[name][key] / results['python -c "import torch"'][key]

    phase_names = [name for name, _, _ in phases[0]]
    phase_medians = {
        name: {"median_wall_s": statistics.median(run[i][1] for run in phases),
               "median_cpu_s": statistics.median(run[i][2] for run in phases)}
        for i, name in enumerate(phase_names)
    }
    report = {
        "machine": machine(),
        "repeats": args.repeats,
        "load_before": round(load_before, 2),
        "load_after": round(load_after, 2),
        "results": results,
        "decode_phases": phase_medians,
        "targets": {
            "decode_tiny_vs_torch_wall": ratio("effvision decode tiny.evc (32x32, mambaic)", "median_wall_s"),
            "decode_tiny_vs_torch_cpu": ratio("effvision decode tiny.evc (32x32, mambaic)", "median_cpu_s"),
            "missing_vs_torch_wall": ratio("effvision decode missing.evc", "median_wall_s"),
        },
        "notes": _notes(results, phase_medians),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode(), force=True)
    atomic_write_bytes(args.out.with_suffix(".md"), to_markdown(report).encode(), force=True)
    print(to_markdown(report))


if __name__ == "__main__":
    main()
