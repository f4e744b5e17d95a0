"""``effvision info``: what an ``.evc`` file holds."""

from __future__ import annotations

import argparse
import json

HELP = "show codec, image size, bits per pixel and sections of .evc files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="EVC", help=".evc files, directories, globs; - = stdin")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")


def describe(container, file_bytes: int) -> dict:
    """The facts ``info`` prints, as a dict (bpp counts the whole file, headers included)."""
    pixels = container.width * container.height
    return {
        "codec": container.codec,
        "config_id": container.config_id,
        "fingerprint": container.fingerprint.hex(),
        "version": container.version,
        "width": container.width,
        "height": container.height,
        "mode": container.mode.name,
        "padding": [container.pad_right, container.pad_bottom],
        "tile": [container.tile_width, container.tile_height] if container.version >= 2 else None,
        "tiles": len(container.tiles),
        "bytes": file_bytes,
        "bpp": 8 * file_bytes / pixels,
        "payload_bpp": 8 * sum(len(s.data) for s in container.sections) / pixels,
        "sections": [
            {"index": i, "kind": s.kind.name.lower(), "bytes": len(s.data), "lost": s.lost, "tile_start": s.tile_start}
            for i, s in enumerate(container.sections)
        ],
    }


def _text(path: str, facts: dict) -> str:
    pad_right, pad_bottom = facts["padding"]
    lines = [
        f"{path}:",
        f"  codec    {facts['codec']} ({facts['config_id'] or '-'}), fingerprint {facts['fingerprint'][:16]}",
        f"  image    {facts['width']}x{facts['height']} {facts['mode']}, pad {pad_right} x {pad_bottom}",
        f"  format   version {facts['version']}, {facts['tiles']} tile(s)"
        + (f" of {facts['tile'][0]}x{facts['tile'][1]}" if facts["tile"] else ""),
        f"  size     {facts['bytes']} bytes, {facts['bpp']:.4f} bpp ({facts['payload_bpp']:.4f} payload)",
        f"  sections {len(facts['sections'])}",
    ]
    for section in facts["sections"]:
        state = "lost" if section["lost"] else f"{section['bytes']} bytes"
        start = "  (tile start)" if section["tile_start"] else ""
        lines.append(f"    [{section['index']}] {section['kind']:<6} {state}{start}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from effvision.cli import Batch
    from effvision.codecs.container import MAX_FILE_BYTES, parse
    from effvision.io_utils import expand_inputs, read_bytes

    batch = Batch(args.command, args.debug)
    missing: list[str] = []
    paths = expand_inputs(args.inputs, (".evc",), errors=missing)
    for message in missing:
        batch.fail(message)
    for path in paths:
        with batch.item(path):
            data = read_bytes(path, MAX_FILE_BYTES)
            facts = describe(parse(data), len(data))
            print(json.dumps({"file": path, **facts}) if args.json else _text(path, facts))
    return batch.exit_code
