"""Build a corpus of real photographs for codec training and testing (not committed: run it where you need it).

Sources, and only these, so that checks on other photos stay independent:

* the Debian packages ``plasma-workspace-wallpapers``, ``ukui-wallpapers``, ``lomiri-wallpapers-20.04`` and
  ``gnome-backgrounds`` (``apt-get download`` + ``dpkg-deb -x`` into ``--work``; run ``apt-get update`` once
  first), one image per wallpaper (the largest variant; screenshots and dark variants of the same artwork skipped);
* scikit-image's bundled photographs (astronaut, chelsea, coffee, rocket, motorcycle_left, hubble_deep_field).

Most wallpapers are artwork, not photographs. A wallpaper is kept as a photograph when, in this order:

1. its source is a JPEG (cameras write JPEG; every PNG and WebP in these packages is a render);
2. it is not on the exclude list (``DEFAULT_EXCLUDE`` + ``--exclude``: audited artwork that passes the statistics);
3. it names a camera in its EXIF (``Make`` or ``Model``), or its statistics are those of a photograph: at about
   512 px, fewer than 35% of pixels are *flat* (|Laplacian| < 1 grey level; vector art and smooth renders are
   mostly flat fills and gradients) and the kurtosis of horizontal grey differences is below 110 (flat fills cut
   by hard edges give very heavy tails; camera noise and texture keep photographs lighter-tailed).

The thresholds were set by looking at these four packages; every decision is printed with its numbers so a
person can audit it (and extend ``--exclude``). The scikit-image photographs are known photographs (no test).

Outputs in ``--out``:

* ``test/<id>.png``: one 768x512 crop per test photo (Lanczos-resized to the smallest size that covers
  768x512, at least 2x down for JPEG sources, then the centre crop). ``--test-count`` (default 10) photos that
  can give such a crop are drawn with ``--seed``; nothing of a test photo is ever in ``train/``.
* ``train/<id>-<k>.png``: ``--crops-per-photo`` random ``--crop`` squares per training photo. Each photo is first
  resized to a short side of ``--short-side`` (at least 2x down for JPEG sources, which removes JPEG blocking,
  but never below the crop size); each crop then takes a random window of ``crop * s`` pixels, ``s`` uniform in
  [1, ``--max-zoom``], resized to ``crop``.
* ``train.npy`` (with ``--npy``): the training crops as one (N, crop, crop, 3) uint8 array.
* ``manifest.json``: every candidate image with its package, version, file, license note (the package's
  ``metadata.json`` or ``debian/copyright``), the decision and its numbers, the split and the files written.

Deterministic given ``--seed`` (inputs sorted, one seeded generator, Pillow's deterministic resampling)::

    python scripts/make_photo_corpus.py --out /work/photo-corpus --work /work/photo-corpus-packages
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = ("plasma-workspace-wallpapers", "ukui-wallpapers", "lomiri-wallpapers-20.04", "gnome-backgrounds")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TEST_SIZE = (768, 512)
FLAT_LAPLACIAN = 1.0
MAX_FLAT_FRACTION = 0.35
MAX_GRADIENT_KURTOSIS = 110.0
ANALYSIS_SIDE = 512
MIN_JPEG_DOWNSCALE = 2.0
EXIF_MAKE, EXIF_MODEL = 271, 272

# Artwork that passes the statistics (audited by eye): id -> why it is excluded.
DEFAULT_EXCLUDE = {
    "plasma-workspace-wallpapers/Autumn": "digital painting (brush texture passes the statistics)",
    "plasma-workspace-wallpapers/SafeLanding": "digital illustration (dense texture passes the statistics)",
}

SKIMAGE_PHOTOS = {
    "astronaut": ("astronaut.png", "public domain (NASA)"),
    "chelsea": ("chelsea.png", "CC0 (Stefan van der Walt)"),
    "coffee": ("coffee.png", "CC0 (Rachel Michetti)"),
    "rocket": ("rocket.jpg", "public domain (SpaceX)"),
    "motorcycle_left": ("motorcycle_left.png", "Middlebury stereo dataset 2014 (Scharstein et al.)"),
    "hubble_deep_field": ("hubble_deep_field.jpg", "public domain (NASA)"),
}


@dataclass
class Candidate:
    """One source image: ``id`` is ``<package>/<name>``."""

    id: str
    package: str
    version: str
    path: Path
    file: str
    license: str | None
    photo: bool = False
    reason: str = ""
    features: dict = field(default_factory=dict)
    split: str | None = None
    outputs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- photo heuristic


def image_statistics(image: Image.Image) -> dict:
    """Flat fraction and gradient kurtosis of an image's grey levels at about ``ANALYSIS_SIDE`` px."""
    image = image.convert("RGB")
    factor = max(1, min(image.size) // ANALYSIS_SIDE)
    grey = np.asarray(image.reduce(factor) if factor > 1 else image, dtype=np.float64).mean(axis=2)
    laplacian = np.abs(
        4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    )
    differences = np.diff(grey, axis=1).ravel()
    variance = differences.var()
    kurtosis = float(((differences - differences.mean()) ** 4).mean() / variance**2) if variance > 0 else float("inf")
    flat = float((laplacian < FLAT_LAPLACIAN).mean())
    return {"flat_fraction": round(flat, 4), "gradient_kurtosis": round(kurtosis, 2)}


def camera_name(image: Image.Image) -> str | None:
    """The camera named by the EXIF Make/Model tags, if any."""
    exif = image.getexif()
    name = " ".join(str(exif.get(tag, "")).strip("\x00 ") for tag in (EXIF_MAKE, EXIF_MODEL)).strip()
    return name or None


def classify(image: Image.Image, source_format: str | None, excluded: str | None = None) -> tuple[bool, str, dict]:
    """Decide whether a wallpaper is a photograph.

    Args:
        image: the opened source image (EXIF still attached).
        source_format: Pillow's format of the file (``"JPEG"``, ``"PNG"``, ``"WEBP"``...).
        excluded: the reason when the image is on the exclude list.

    Returns:
        (is_photo, reason, numbers behind the decision).
    """
    features = {"format": source_format, "camera": camera_name(image)}
    if source_format != "JPEG":
        return False, f"{source_format} source (renders, not camera files)", features
    if excluded:
        return False, f"exclude list: {excluded}", features
    if features["camera"]:
        return True, f"camera EXIF ({features['camera']})", features
    features.update(image_statistics(image))
    flat, kurtosis = features["flat_fraction"], features["gradient_kurtosis"]
    if flat >= MAX_FLAT_FRACTION:
        return False, f"flat fraction {flat:.2f} >= {MAX_FLAT_FRACTION} (flat fills / smooth gradients)", features
    if kurtosis >= MAX_GRADIENT_KURTOSIS:
        reason = f"gradient kurtosis {kurtosis:.0f} >= {MAX_GRADIENT_KURTOSIS:.0f} (hard edges on flat fills)"
        return False, reason, features
    return True, f"statistics (flat {flat:.2f}, kurtosis {kurtosis:.0f})", features


# -------------------------------------------------------------------------------------------------- sources


def fetch_packages(work: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, tuple[Path, str]]:
    """``apt-get download`` (unless a .deb is already in ``work/debs``) and ``dpkg-deb -x`` each package.

    Returns package -> (extracted root, version)."""
    debs, roots = work / "debs", {}
    debs.mkdir(parents=True, exist_ok=True)
    for package in packages:
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            print(f"apt-get download {package}", file=sys.stderr)
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
            found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise SystemExit(f"apt-get download {package} wrote no .deb in {debs}")
        deb = found[-1]
        root = work / "extracted" / package
        if not root.exists():  # extract beside, then rename: an interrupted extraction is never taken as done
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
            partial.rename(root)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        roots[package] = (root, version)
    return roots


def copyright_license(copyright_text: str, path: Path) -> str | None:
    """The License of the last DEP-5 ``Files:`` stanza whose pattern's file name matches ``path``'s
    (``debian/*`` stanzas skipped); for free-form files, the distinct ``Licensed under ...`` sentences."""
    license_name = None
    for stanza in re.split(r"\n\s*\n", copyright_text):
        files = re.search(r"^Files:\s*(.+(?:\n[ \t].+)*)", stanza, re.MULTILINE)
        found = re.search(r"^License:\s*(.+)", stanza, re.MULTILINE)
        if not files or not found:
            continue
        patterns = [p for p in files.group(1).split() if not p.startswith("debian/")]
        if any(fnmatch.fnmatch(path.name, Path(p).name) for p in patterns):
            license_name = found.group(1).strip()
    if license_name is None:
        sentences = sorted(set(re.findall(r"Licensed under ([^\n]+?)\.?(?:\s*\n|$)", copyright_text)))
        license_name = "; ".join(sentences) or None
    return license_name


def _plasma_license(image_path: Path) -> str | None:
    for parent in image_path.parents:
        metadata = parent / "metadata.json"
        if metadata.is_file():
            plugin = json.loads(metadata.read_text(encoding="utf-8")).get("KPlugin", {})
            authors = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
            return f"{plugin.get('License', '?')} ({authors})" if authors else plugin.get("License")
    return None


def _wallpaper_name(root: Path, path: Path) -> str:
    relative = path.relative_to(root).parts
    if "wallpapers" in relative and "contents" in relative:  # KDE layout: wallpapers/<Name>/contents/images/WxH
        return relative[relative.index("wallpapers") + 1]
    return re.sub(r"-(l|d|light|dark)$", "", path.stem)


def package_candidates(package: str, root: Path, version: str) -> list[Candidate]:
    """One candidate per wallpaper: its largest image (screenshots and dark variants skipped)."""
    copyright_files = list(root.glob("usr/share/doc/*/copyright"))
    copyright_text = copyright_files[0].read_text(encoding="utf-8", errors="replace") if copyright_files else ""
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem == "screenshot" or "images_dark" in path.parts:
            continue
        groups.setdefault(_wallpaper_name(root, path), []).append(path)
    candidates = []
    for name, paths in sorted(groups.items()):
        sizes = {}
        for path in paths:
            with Image.open(path) as image:
                sizes[path] = image.size[0] * image.size[1]
        best = max(paths, key=lambda p: (sizes[p], str(p)))
        license_note = _plasma_license(best) or copyright_license(copyright_text, best)
        candidates.append(
            Candidate(f"{package}/{name}", package, version, best, str(best.relative_to(root)), license_note)
        )
    return candidates


def skimage_candidates() -> list[Candidate]:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    version = skimage.__version__
    return [
        Candidate(f"scikit-image/{name}", "scikit-image", version, data / file, f"skimage/data/{file}", note,
                  photo=True, reason="scikit-image photograph (known)")
        for name, (file, note) in SKIMAGE_PHOTOS.items()
    ]


# -------------------------------------------------------------------------------------------------- cropping


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def can_give_test_crop(image_size: tuple[int, int], jpeg_source: bool, size: tuple[int, int] = TEST_SIZE) -> bool:
    """Whether an image covers ``size`` after the downscaling its source needs (2x for JPEG)."""
    scale = max(size[0] / image_size[0], size[1] / image_size[1])
    return scale <= (1 / MIN_JPEG_DOWNSCALE if jpeg_source else 1.0)


def test_crop(image: Image.Image, jpeg_source: bool, size: tuple[int, int] = TEST_SIZE) -> Image.Image:
    """The centre ``size`` crop of the image resized to the smallest size covering ``size`` (at least
    ``MIN_JPEG_DOWNSCALE`` x down for JPEG sources, see :func:`can_give_test_crop`)."""
    if not can_give_test_crop(image.size, jpeg_source, size):
        raise ValueError(f"a {image.width}x{image.height} image cannot give a {size[0]}x{size[1]} test crop")
    width, height = image.size
    scale = max(size[0] / width, size[1] / height)
    resized = image.resize((max(size[0], round(width * scale)), max(size[1], round(height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - size[0]) // 2, (resized.height - size[1]) // 2
    return resized.crop((left, top, left + size[0], top + size[1]))


def training_base(image: Image.Image, jpeg_source: bool, short_side: int, crop: int) -> Image.Image:
    """Resize to a short side of ``short_side`` (at least 2x down for JPEG), never below ``crop``."""
    short = min(image.size)
    factor = max(MIN_JPEG_DOWNSCALE if jpeg_source else 1.0, short / short_side)
    factor = max(1.0, min(factor, short / crop))
    if factor == 1.0:
        return image
    size = (round(image.width / factor), round(image.height / factor))
    return image.resize(size, Image.Resampling.LANCZOS)


def random_crops(base: Image.Image, count: int, crop: int, max_zoom: float, rng: np.random.Generator) -> list:
    """``count`` crops: windows of ``crop * s`` px (``s`` ~ U[1, max_zoom], capped by the image) resized to ``crop``."""
    crops = []
    for _ in range(count):
        window = min(round(crop * rng.uniform(1.0, max_zoom)), min(base.size))
        left = int(rng.integers(0, base.width - window + 1))
        top = int(rng.integers(0, base.height - window + 1))
        box = (left, top, left + window, top + window)
        crops.append(base.resize((crop, crop), Image.Resampling.LANCZOS, box=box))
    return crops


# ------------------------------------------------------------------------------------------------------ main


def _safe_name(candidate_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", candidate_id.replace("/", "__"))


def choose_test(photos: list[Candidate], can_test: dict[str, bool], count: int, seed: int) -> set[str]:
    """``count`` photo ids drawn with ``seed`` among those that can give a test crop."""
    eligible = sorted(c.id for c in photos if can_test[c.id])
    if len(eligible) < count:
        raise SystemExit(f"only {len(eligible)} photos can give a {TEST_SIZE[0]}x{TEST_SIZE[1]} test crop; "
                         f"--test-count {count} asks for more")
    order = np.random.default_rng(seed).permutation(len(eligible))
    return {eligible[i] for i in order[:count]}


def load_train_crops(path: Path) -> np.ndarray:
    """``train.npy`` as written by ``--npy``: (N, crop, crop, 3) uint8, checked (the training scripts read it).
    Or the ``train/`` folder of PNG crops itself (the smallest form, to carry to a GPU machine)."""
    if Path(path).is_dir():
        crops = np.stack([np.asarray(Image.open(file).convert("RGB")) for file in sorted(Path(path).glob("*.png"))])
    else:
        crops = np.load(path)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise SystemExit(f"{path}: expected (N, H, W, 3) uint8 crops, got {crops.shape} {crops.dtype}")
    return crops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="corpus folder (train/, test/, manifest.json)")
    parser.add_argument("--work", type=Path, help="downloads and extracted packages (default OUT/packages)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-count", type=int, default=10, help="photos held out as the test set")
    parser.add_argument("--crop", type=int, default=256, help="side of the training crops")
    parser.add_argument("--crops-per-photo", type=int, default=32)
    parser.add_argument("--short-side", type=int, default=768, help="short side training photos are resized to")
    parser.add_argument("--max-zoom", type=float, default=2.0, help="largest window / crop ratio")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="ID",
                        help="more ids to drop as artwork (e.g. plasma-workspace-wallpapers/Volna)")
    parser.add_argument("--npy", action="store_true", help="also write train.npy (N, crop, crop, 3) uint8")
    args = parser.parse_args(argv)

    exclude = dict(DEFAULT_EXCLUDE) | {name: "--exclude" for name in args.exclude}
    candidates: list[Candidate] = []
    for package, (root, version) in fetch_packages(args.work or args.out / "packages").items():
        candidates += package_candidates(package, root, version)
    candidates += skimage_candidates()
    unknown = set(args.exclude) - {c.id for c in candidates}
    if unknown:
        raise SystemExit(f"--exclude names unknown ids: {', '.join(sorted(unknown))}")

    images: dict[str, Image.Image] = {}
    can_test: dict[str, bool] = {}
    print(f"{'decision':8s} {'id':50s} reason")
    for candidate in candidates:
        with Image.open(candidate.path) as opened:
            source_format = opened.format
            if candidate.package != "scikit-image":
                candidate.photo, candidate.reason, candidate.features = classify(
                    opened, source_format, exclude.get(candidate.id)
                )
            candidate.features.setdefault("format", source_format)
            candidate.features["size"] = list(opened.size)
            if candidate.photo:
                images[candidate.id] = _rgb(opened)
        if candidate.photo:
            can_test[candidate.id] = can_give_test_crop(images[candidate.id].size, source_format == "JPEG")
        print(f"{'photo' if candidate.photo else 'drop':8s} {candidate.id:50s} {candidate.reason}")

    photos = [c for c in candidates if c.photo]
    test_ids = choose_test(photos, can_test, args.test_count, args.seed)
    rng = np.random.default_rng(args.seed)
    (args.out / "train").mkdir(parents=True, exist_ok=True)
    (args.out / "test").mkdir(parents=True, exist_ok=True)
    stack = []
    for candidate in sorted(photos, key=lambda c: c.id):
        jpeg = candidate.features["format"] == "JPEG"
        image, name = images[candidate.id], _safe_name(candidate.id)
        if candidate.id in test_ids:
            candidate.split = "test"
            out = Path("test") / f"{name}.png"
            test_crop(image, jpeg).save(args.out / out)
            candidate.outputs = [str(out)]
            continue
        candidate.split = "train"
        base = training_base(image, jpeg, args.short_side, args.crop)
        candidate.features["train_base_size"] = list(base.size)
        for k, crop in enumerate(random_crops(base, args.crops_per_photo, args.crop, args.max_zoom, rng)):
            out = Path("train") / f"{name}-{k:03d}.png"
            crop.save(args.out / out)
            candidate.outputs.append(str(out))
            if args.npy:
                stack.append(np.asarray(crop))
    if args.npy:
        np.save(args.out / "train.npy", np.stack(stack))

    manifest = {
        "seed": args.seed,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "heuristic": {"max_flat_fraction": MAX_FLAT_FRACTION, "max_gradient_kurtosis": MAX_GRADIENT_KURTOSIS,
                      "flat_laplacian": FLAT_LAPLACIAN, "analysis_side": ANALYSIS_SIDE, "exclude": exclude},
        "images": [
            {"id": c.id, "package": c.package, "version": c.version, "file": c.file, "license": c.license,
             "photo": c.photo, "reason": c.reason, "features": c.features, "split": c.split, "outputs": c.outputs}
            for c in candidates
        ],
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    counts = {split: sum(c.split == split for c in photos) for split in ("train", "test")}
    print(f"{len(photos)} photos of {len(candidates)} images: {counts['train']} train "
          f"({sum(len(c.outputs) for c in photos if c.split == 'train')} crops), {counts['test']} test -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
