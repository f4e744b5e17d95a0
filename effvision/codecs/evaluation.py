"""Rate-distortion evaluation of the learned codecs against classical ones, on real files.

Learned codecs run through the real file path (:func:`~effvision.codecs.imagefile.encode_image` ->
``.evc`` bytes -> parse -> :func:`~effvision.codecs.imagefile.decode_image`), so a rate is the size of the
file a user would store, container header included; classical rates are whole Pillow files too. Quality is
measured on the 8-bit RGB images each decoder returns: PSNR and MS-SSIM (:mod:`effvision.codecs.metrics`).

Three views of the same images:

* **curves**: every classical codec over a fixed grid of its quality settings (the RD curves);
* **matched bytes**: for every learned file, each classical codec's setting whose file size is closest
  (the actual sizes are reported; where no setting gets within 25% the row says so);
* **BD-rate** (:func:`bd_rate`) and **BD-PSNR** (:func:`bd_psnr`) of each learned quality ladder against each
  classical curve.

Classical codecs (Pillow): ``jpeg``, ``webp``, ``avif``, ``jxl`` (needs ``pillow-jxl-plugin``; skipped with a
note when missing) and, for extreme rates, ``avif-down`` / ``webp-down``: the image downscaled 2x, 3x or 4x
(Lanczos), coded, decoded and upscaled back (bicubic); at a matched size the factor with the best PSNR among
those within 25% of the target size is taken (else the closest size). Encoder settings (each report states
them): JPEG with optimised Huffman tables, 4:2:0; WebP method 6; AVIF speed 6, 4:2:0; JPEG XL effort 7.
"""

from __future__ import annotations

import io
import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effvision.codecs.metrics import ms_ssim, psnr
from effvision.errors import UserError
from effvision.image_io import rgb_image

MATCH_TOLERANCE = 0.25
#: qualities either side of the bisection's crossing compared for the closest file size (sizes are not
#: strictly monotone in quality)
MATCH_WINDOW = 4
DOWNSCALE_FACTORS = (2, 3, 4)


# --------------------------------------------------------------------------------------------- BD-rate


def _pareto(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (rate, quality) points no other point beats in both, sorted by rate, quality strictly rising. Points
    without a finite positive rate and a finite quality are left out (a lossless decode has infinite PSNR)."""
    front: list[tuple[float, float]] = []
    finite = [(r, q) for r, q in points if math.isfinite(r) and r > 0 and math.isfinite(q)]
    for rate, quality in sorted(finite, key=lambda p: (p[0], -p[1])):
        if not front or quality > front[-1][1]:
            front.append((rate, quality))
    return front


def _fit(curve: Sequence[tuple[float, float]], method: str) -> tuple[Callable, Callable]:
    """(value at x, integral between two x) of the curve y(x) through ``curve``'s (x, y) points, x rising.

    PCHIP (piecewise cubic Hermite, monotone: the Bjøntegaard variant of VCEG-AL22) or one least-squares cubic
    (``method="cubic"``, the original VCEG-M33 fit; needs 4 points)."""
    from scipy.interpolate import PchipInterpolator

    x = np.array([a for a, _ in curve], dtype=np.float64)
    y = np.array([b for _, b in curve], dtype=np.float64)
    if method == "cubic":
        if len(curve) < 4:
            raise ValueError("the cubic Bjøntegaard fit needs at least 4 points a curve")
        coefficients = np.polyfit(x, y, 3)
        primitive = np.polyint(coefficients)
        return (lambda v: np.polyval(coefficients, v)), (lambda a, b: np.polyval(primitive, b) -
                                                         np.polyval(primitive, a))
    spline = PchipInterpolator(x, y)
    return spline, spline.integrate


def _bd_mean_difference(anchor: list[tuple[float, float]], test: list[tuple[float, float]],
                        method: str) -> float | None:
    """Mean of ``y_test(x) - y_anchor(x)`` over the x range both (x, y) curves cover (x rising); a one-point
    ``test`` gives the difference at its x. None when they share no range."""
    if method not in ("pchip", "cubic"):
        raise ValueError(f"method must be 'pchip' or 'cubic', got {method!r}")
    if len(test) == 1:
        x, y = test[0]
        if not anchor[0][0] <= x <= anchor[-1][0]:
            return None
        return y - float(_fit(anchor, method)[0](x))
    low, high = max(anchor[0][0], test[0][0]), min(anchor[-1][0], test[-1][0])
    if high <= low:
        return None
    return (float(_fit(test, method)[1](low, high)) - float(_fit(anchor, method)[1](low, high))) / (high - low)


def bd_rate(
    anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]], method: str = "pchip"
) -> float | None:
    """Bjøntegaard delta rate of ``test`` against ``anchor``: the mean rate difference at equal quality.

    Each curve is a list of (rate, quality) points (e.g. bpp, PSNR dB). Log-rate is interpolated as a
    function of quality, by a piecewise cubic Hermite (PCHIP, monotone: the Bjøntegaard variant of VCEG-AL22)
    or by one least-squares cubic (``method="cubic"``, the original VCEG-M33 fit; needs 4 points a curve), and
    the difference is averaged over the qualities both curves cover:
    ``exp(mean(log R_test - log R_anchor)) - 1`` (-0.2 = test needs 20% fewer bits).

    A one-point ``test`` curve gives the rate difference at its quality (the range is a single point);
    dominated points (more rate, no more quality) are dropped first. Returns None when the curves share no
    quality range.
    """
    anchor, test = _pareto(anchor), _pareto(test)
    if len(anchor) < 2 or not test:
        raise ValueError("bd_rate needs at least two anchor points and one test point")
    swapped = [[(quality, math.log(rate)) for rate, quality in curve] for curve in (anchor, test)]
    difference = _bd_mean_difference(*swapped, method)
    return None if difference is None else math.exp(difference) - 1.0


def bd_psnr(
    anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]], method: str = "pchip"
) -> float | None:
    """Bjøntegaard delta quality of ``test`` against ``anchor``: the mean quality difference at equal rate.

    The companion of :func:`bd_rate` (VCEG-M33's "BD-PSNR"): quality is interpolated as a function of
    log-rate on each curve's Pareto front and the difference ``Q_test - Q_anchor`` is averaged over the
    log-rates both curves cover (+1.0 = test is 1 dB better at the same size). It exists whenever the rate
    ranges overlap, also where the quality ranges do not (when :func:`bd_rate` has no answer). A one-point
    ``test`` gives the difference at its rate. Returns None when the curves share no rate range.
    """
    anchor, test = _pareto(anchor), _pareto(test)
    if len(anchor) < 2 or not test:
        raise ValueError("bd_psnr needs at least two anchor points and one test point")
    logged = [[(math.log(rate), quality) for rate, quality in curve] for curve in (anchor, test)]
    return _bd_mean_difference(*logged, method)


# ------------------------------------------------------------------------------------------ classical codecs


def jxl_available() -> bool:
    """Whether Pillow can write JPEG XL (``pillow-jxl-plugin`` installed)."""
    try:
        import pillow_jxl  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ClassicalCodec:
    """A Pillow format with its quality range, the grid the RD curve samples and the encoder settings.

    ``options`` are passed to ``Image.save`` beside ``quality``: each codec at the settings a careful user
    would pick, stated in every report (:meth:`settings`), so that no learned codec wins against a handicapped
    anchor (a JPEG without optimised Huffman tables was 3-108% larger at the same pixels on our test photos, the
    most at low quality).
    """

    name: str
    pillow_format: str
    quality_range: tuple[int, int]
    grid: tuple[int, ...]
    downscale: tuple[int, ...] = (1,)
    options: tuple[tuple[str, object], ...] = ()

    def settings(self) -> str:
        """The encoder settings in words (``JPEG optimize=True``)."""
        words = [self.pillow_format] + [f"{key}={value}" for key, value in self.options]
        if len(self.downscale) > 1:
            words.append(f"downscaled {'/'.join(f'{f}x' for f in self.downscale)} (Lanczos), bicubic back up")
        return " ".join(words)

    def encode(self, pixels: np.ndarray, quality: int, factor: int = 1) -> tuple[bytes, float]:
        """(file bytes, seconds) of an (H, W, 3) uint8 image, downscaled by ``factor`` first."""
        started = time.perf_counter()
        image = Image.fromarray(pixels)
        if factor > 1:
            size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        if self.pillow_format == "JXL":
            import pillow_jxl  # noqa: F401  (registers the format with Pillow)
        buffer = io.BytesIO()
        image.save(buffer, format=self.pillow_format, quality=quality, **dict(self.options))
        return buffer.getvalue(), time.perf_counter() - started

    def decode(self, data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        """(H, W, 3) uint8 pixels at ``size`` (W, H), bicubic-upscaled when stored smaller, and seconds."""
        started = time.perf_counter()
        if self.pillow_format == "JXL":
            import pillow_jxl  # noqa: F401
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            pixels = np.asarray(image)
        return pixels, time.perf_counter() - started


_QUALITY_GRID = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
_DOWNSCALED_GRID = (5, 20, 40, 60, 80)

# libjpeg(-turbo) baseline with optimised Huffman tables (4:2:0); WebP at its slowest, best method; AVIF
# (libavif/aom) at Pillow's speed 6, 4:2:0; JPEG XL (libjxl) at effort 7, its default
_JPEG_OPTIONS = (("optimize", True), ("subsampling", "4:2:0"))
_WEBP_OPTIONS = (("method", 6),)
_AVIF_OPTIONS = (("speed", 6), ("subsampling", "4:2:0"))
_JXL_OPTIONS = (("effort", 7),)

CLASSICAL: dict[str, ClassicalCodec] = {
    "jpeg": ClassicalCodec("jpeg", "JPEG", (1, 95), _QUALITY_GRID, options=_JPEG_OPTIONS),
    "webp": ClassicalCodec("webp", "WEBP", (0, 100), _QUALITY_GRID, options=_WEBP_OPTIONS),
    "avif": ClassicalCodec("avif", "AVIF", (0, 100), _QUALITY_GRID, options=_AVIF_OPTIONS),
    # pillow-jxl's quality 100 is distance 0, which libjxl refuses unless lossless=True is passed too
    "jxl": ClassicalCodec("jxl", "JXL", (1, 99), _QUALITY_GRID, options=_JXL_OPTIONS),
    "avif-down": ClassicalCodec("avif-down", "AVIF", (0, 100), _DOWNSCALED_GRID, DOWNSCALE_FACTORS, _AVIF_OPTIONS),
    "webp-down": ClassicalCodec("webp-down", "WEBP", (0, 100), _DOWNSCALED_GRID, DOWNSCALE_FACTORS, _WEBP_OPTIONS),
}


def classical_codecs(names: Sequence[str], note: Callable[[str], None] = print) -> list[ClassicalCodec]:
    """The named classical codecs; ``jxl`` is left out, with a note, when its plugin is missing."""
    unknown = [n for n in names if n not in CLASSICAL]
    if unknown:
        raise UserError(f"unknown classical codec(s) {', '.join(unknown)}; available: {', '.join(CLASSICAL)}")
    if "jxl" in names and not jxl_available():
        note("note: JPEG XL rows skipped: pillow-jxl-plugin is not installed (pip install pillow-jxl-plugin)")
        names = [n for n in names if n != "jxl"]
    return [CLASSICAL[n] for n in dict.fromkeys(names)]


# ------------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One coded image.

    ``setting`` is the quality label (``q3``, a checkpoint name, ``75``, ``3x q40``); matched rows name the
    learned file they match in ``target`` (``<learned label>``) with its size in ``target_bytes``.
    """

    image: str
    codec: str
    setting: str
    bytes: int
    bpp: float
    psnr: float
    ms_ssim: float
    encode_s: float
    decode_s: float
    target: str | None = None
    target_bytes: int | None = None


def _as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(255)


def _measure(image: str, codec: str, setting: str, reference: torch.Tensor, decoded: np.ndarray, size: int,
             encode_s: float, decode_s: float, with_ms_ssim: bool = True) -> Row:
    pixels = reference.shape[-2] * reference.shape[-1]
    distorted = _as_tensor(decoded)
    quality = ms_ssim(reference, distorted) if with_ms_ssim else math.nan
    return Row(image, codec, setting, size, 8 * size / pixels, psnr(reference, distorted), quality, encode_s, decode_s)


_FLOAT_FIELDS = ("bpp", "psnr", "ms_ssim", "encode_s", "decode_s")


def json_safe(value: object) -> object:
    """``value`` (dicts, lists, numbers) with every non-finite float written as the string "inf", "-inf" or "nan"
    (a lossless decode has infinite PSNR), so that ``json.dumps(..., allow_nan=False)`` gives strict JSON;
    :meth:`Evaluation.from_dict` reads such rows back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value

class _ClassicalRuns:
    """Encodes of one image, cached by (codec, factor, quality): searches revisit settings."""

    def __init__(self, name: str, pixels: np.ndarray) -> None:
        self.name, self.pixels = name, pixels
        self.reference = _as_tensor(pixels)
        self._encoded: dict[tuple[str, int, int], tuple[bytes, float]] = {}

    def encoded(self, codec: ClassicalCodec, quality: int, factor: int) -> tuple[bytes, float]:
        key = (codec.name, factor, quality)
        if key not in self._encoded:
            self._encoded[key] = codec.encode(self.pixels, quality, factor)
        return self._encoded[key]

    def coded(self, codec: ClassicalCodec, quality: int, factor: int, with_ms_ssim: bool = True
              ) -> tuple[Row, np.ndarray]:
        """The measured row of one setting and its decoded (H, W, 3) uint8 pixels."""
        data, encode_s = self.encoded(codec, quality, factor)
        decoded, decode_s = codec.decode(data, (self.pixels.shape[1], self.pixels.shape[0]))
        setting = f"{factor}x q{quality}" if factor > 1 else str(quality)
        row = _measure(self.name, codec.name, setting, self.reference, decoded, len(data), encode_s, decode_s,
                       with_ms_ssim)
        return row, decoded

    def row(self, codec: ClassicalCodec, quality: int, factor: int, with_ms_ssim: bool = True) -> Row:
        return self.coded(codec, quality, factor, with_ms_ssim)[0]

    def closest_quality(self, codec: ClassicalCodec, factor: int, target_bytes: int) -> int:
        """The quality whose file size is closest to ``target_bytes``.

        Sizes rise with quality almost everywhere, but not strictly (WebP and JPEG XL sizes can dip by a few
        bytes from one quality to the next), so a bisection finds the crossing and then every quality within
        :data:`MATCH_WINDOW` of it is compared; ties go to the lower quality.
        """
        low, high = codec.quality_range
        while low < high:
            middle = (low + high) // 2
            if len(self.encoded(codec, middle, factor)[0]) < target_bytes:
                low = middle + 1
            else:
                high = middle
        first = max(codec.quality_range[0], low - MATCH_WINDOW)
        last = min(codec.quality_range[1], low + MATCH_WINDOW)
        return min(range(first, last + 1),
                   key=lambda q: (abs(len(self.encoded(codec, q, factor)[0]) - target_bytes), q))

    def matched(self, codec: ClassicalCodec, target_bytes: int) -> Row:
        settings = [(self.closest_quality(codec, f, target_bytes), f) for f in codec.downscale]
        if len(settings) == 1:
            return self.row(codec, *settings[0])
        rows = {s: self.row(codec, *s, with_ms_ssim=False) for s in settings}  # MS-SSIM only for the one kept
        within = [s for s, r in rows.items() if abs(r.bytes - target_bytes) <= MATCH_TOLERANCE * target_bytes]
        if within:
            return self.row(codec, *max(within, key=lambda s: rows[s].psnr))
        return self.row(codec, *min(rows, key=lambda s: abs(rows[s].bytes - target_bytes)))


# --------------------------------------------------------------------------------------------- learned


@dataclass
class LearnedCodec:
    """A learned codec at one rate: ``label`` names the point of its ladder (``q2``, a checkpoint stem)."""

    name: str
    label: str
    codec: object  # effvision.codecs.base.ImageCodec


def learned_ladder(
    name: str,
    qualities: Sequence[int] | None = None,
    checkpoints: Sequence[str | Path] | None = None,
    device: str = "cpu",
    note: Callable[[str], None] = print,
) -> list[LearnedCodec]:
    """Load a codec's quality ladder through the codec registry.

    ``checkpoints``: one point per file; ``qualities``: those shipped qualities; neither: every shipped
    quality 1, 2, ... until one is missing (the codec's default weights when it ships no quality 1).
    """
    from effvision.codecs.base import load_codec

    if checkpoints:
        return [LearnedCodec(name, Path(p).stem, load_codec(name, checkpoint=p, device=device)) for p in checkpoints]
    if qualities:
        return [LearnedCodec(name, f"q{q}", load_codec(name, quality=q, device=device)) for q in qualities]
    ladder: list[LearnedCodec] = []
    quality = 1
    while True:
        try:
            codec = load_codec(name, quality=quality, device=device)
        except UserError as error:
            if not ladder:
                codec = load_codec(name, device=device)
                note(f"note: {name} ships no quality ladder ({error}); evaluating its default weights "
                     f"{codec.config_id!r}")
                return [LearnedCodec(name, codec.config_id, codec)]
            note(f"note: {name} ladder ends at quality {quality - 1} ({error})")
            return ladder
        ladder.append(LearnedCodec(name, f"q{quality}", codec))
        quality += 1


def coded_learned(point: LearnedCodec, name: str, image: Image.Image, reference: torch.Tensor
                  ) -> tuple[Row, Image.Image]:
    """One image through the real ``.evc`` file path (encode to bytes, parse, decode): the measured row and
    the decoded RGB image."""
    from effvision.codecs.container import parse
    from effvision.codecs.imagefile import decode_image, encode_image

    started = time.perf_counter()
    data = encode_image(point.codec, image).to_bytes()
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = decode_image(parse(data), point.codec).convert("RGB")
    decode_s = time.perf_counter() - started
    row = _measure(name, point.name, point.label, reference, np.asarray(decoded), len(data), encode_s, decode_s)
    return row, decoded


def run_learned(point: LearnedCodec, name: str, image: Image.Image, reference: torch.Tensor) -> Row:
    """One image through the real ``.evc`` file path: encode to bytes, parse, decode, measure."""
    return coded_learned(point, name, image, reference)[0]


def _warm_up(point: LearnedCodec) -> None:
    from effvision.codecs.imagefile import encode_image

    encode_image(point.codec, Image.new("RGB", (64, 64), (128, 100, 90)))


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Everything one run measured (see the module docstring)."""

    images: list[str]
    learned: list[Row]
    curves: list[Row]
    matched: list[Row]
    notes: list[str] = field(default_factory=list)
    #: classical codec name -> its encoder settings in words (:meth:`ClassicalCodec.settings`)
    classical_settings: dict[str, str] = field(default_factory=dict)

    def mean_curve(self, rows: Sequence[Row], codec: str) -> list[dict]:
        """Per setting: mean bytes, bpp, PSNR, MS-SSIM over images, and MP/s (sum of pixels / sum of times)."""
        settings: dict[str, list[Row]] = {}
        for row in rows:
            if row.codec == codec:
                settings.setdefault(row.setting, []).append(row)
        points = []
        for setting, group in settings.items():
            megapixels = sum(8 * r.bytes / r.bpp for r in group) / 1e6
            points.append({
                "setting": setting, "images": len(group), "bytes": float(np.mean([r.bytes for r in group])),
                "bpp": float(np.mean([r.bpp for r in group])), "psnr": float(np.mean([r.psnr for r in group])),
                "ms_ssim": float(np.mean([r.ms_ssim for r in group])),
                "encode_mp_s": megapixels / max(1e-9, sum(r.encode_s for r in group)),
                "decode_mp_s": megapixels / max(1e-9, sum(r.decode_s for r in group)),
            })
        return sorted(points, key=lambda p: p["bpp"])

    def learned_names(self) -> list[str]:
        return list(dict.fromkeys(r.codec for r in self.learned))

    def classical_names(self) -> list[str]:
        return list(dict.fromkeys(r.codec for r in self.curves))

    def _bjontegaard_table(self, delta: Callable) -> dict[str, dict[str, float | None]]:
        """``delta(classical curve, learned curve)`` on (bpp, PSNR) mean curves, per learned ladder and classical
        codec; None also where a curve has too few finite points (e.g. tiny images decoded losslessly)."""
        table: dict[str, dict[str, float | None]] = {}
        for learned in self.learned_names():
            test = [(p["bpp"], p["psnr"]) for p in self.mean_curve(self.learned, learned)]
            table[learned] = {}
            for classical in self.classical_names():
                anchor = [(p["bpp"], p["psnr"]) for p in self.mean_curve(self.curves, classical)]
                enough = len(_pareto(anchor)) >= 2 and _pareto(test)
                table[learned][classical] = delta(anchor, test) if enough else None
        return table

    def bd_rates(self) -> dict[str, dict[str, float | None]]:
        """BD-rate (PSNR, PCHIP) of each learned ladder vs each classical curve; None: no common PSNR range."""
        return self._bjontegaard_table(bd_rate)

    def bd_psnrs(self) -> dict[str, dict[str, float | None]]:
        """BD-PSNR in dB (PCHIP in log-rate) of each learned ladder vs each classical curve; None: no common
        rate range."""
        return self._bjontegaard_table(bd_psnr)

    def matched_summary(self) -> list[dict]:
        """Per learned point and classical codec: mean sizes and mean quality differences (learned - classical)."""
        learned = {(r.image, r.codec, r.setting): r for r in self.learned}
        groups: dict[tuple[str, str, str], list[tuple[Row, Row]]] = {}
        for row in self.matched:
            codec, _, setting = row.target.partition(":")
            groups.setdefault((codec, setting, row.codec), []).append((learned[(row.image, codec, setting)], row))
        summary = []
        for (codec, setting, classical), pairs in groups.items():
            summary.append({
                "learned": f"{codec}:{setting}", "classical": classical, "images": len(pairs),
                "learned_bytes": float(np.mean([a.bytes for a, _ in pairs])),
                "classical_bytes": float(np.mean([b.bytes for _, b in pairs])),
                "learned_bpp": float(np.mean([a.bpp for a, _ in pairs])),
                "classical_bpp": float(np.mean([b.bpp for _, b in pairs])),
                "learned_psnr": float(np.mean([a.psnr for a, _ in pairs])),
                "classical_psnr": float(np.mean([b.psnr for _, b in pairs])),
                "psnr_difference": float(np.mean([a.psnr - b.psnr for a, b in pairs])),
                "ms_ssim_difference": float(np.mean([a.ms_ssim - b.ms_ssim for a, b in pairs])),
                "unmatched": sum(abs(b.bytes - a.bytes) > MATCH_TOLERANCE * a.bytes for a, b in pairs),
            })
        return summary

    def interpolated_summary(self) -> list[dict]:
        """Per learned point and classical codec, at exactly the learned file's size: the classical PSNR on
        each photo interpolated (linearly in log-bytes) along that photo's classical curve (its Pareto front).

        Photos whose learned file is smaller or larger than every classical setting are left out (counted
        in ``outside``), so a codec cannot win on a photo where the other has no file that size. Returns the
        mean difference (learned - classical) and the number of photos the learned file wins."""
        curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for row in self.curves:
            curves.setdefault((row.image, row.codec), []).append((math.log(row.bytes), row.psnr))
        fronts = {key: _pareto(points) for key, points in curves.items()}
        points: dict[tuple[str, str], list[Row]] = {}
        for row in self.learned:
            points.setdefault((row.codec, row.setting), []).append(row)
        summary = []
        for (name, setting), rows in points.items():
            for classical in self.classical_names():
                differences = []
                for row in rows:
                    front = fronts.get((row.image, classical), [])
                    size = math.log(row.bytes)
                    if len(front) >= 2 and front[0][0] <= size <= front[-1][0]:
                        sizes, qualities = zip(*front, strict=True)
                        differences.append(row.psnr - float(np.interp(size, sizes, qualities)))
                summary.append({
                    "learned": f"{name}:{setting}", "classical": classical, "images": len(rows),
                    "inside": len(differences), "outside": len(rows) - len(differences),
                    "psnr_difference": float(np.mean(differences)) if differences else None,
                    "wins": sum(d > 0 for d in differences),
                })
        return summary

    @classmethod
    def from_dict(cls, data: dict) -> Evaluation:
        """Inverse of :meth:`as_dict` (the rows; summaries are recomputed), also after :func:`json_safe`."""
        rows = data["rows"]

        def row(values: dict) -> Row:
            return Row(**{key: float(value) if key in _FLOAT_FIELDS and isinstance(value, str) else value
                          for key, value in values.items()})

        return cls(data["images"], [row(r) for r in rows["learned"]], [row(r) for r in rows["curves"]],
                   [row(r) for r in rows["matched"]], list(data.get("notes", [])),
                   dict(data.get("classical_settings", {})))

    def as_dict(self) -> dict:
        learned = {n: self.mean_curve(self.learned, n) for n in self.learned_names()}
        classical = {n: self.mean_curve(self.curves, n) for n in self.classical_names()}
        return {
            "images": self.images, "notes": self.notes, "classical_settings": self.classical_settings,
            "learned_mean": learned, "classical_mean": classical,
            "bd_rate_psnr_pchip": self.bd_rates(),
            "bd_psnr_db_pchip": self.bd_psnrs(), "matched_summary": self.matched_summary(),
            "interpolated_summary": self.interpolated_summary(),
            "rows": {"learned": [asdict(r) for r in self.learned], "curves": [asdict(r) for r in self.curves],
                     "matched": [asdict(r) for r in self.matched]},
        }


def evaluate(
    ladders: Sequence[LearnedCodec],
    images: Sequence[tuple[str, Image.Image]],
    classical: Sequence[ClassicalCodec],
    progress: bool = True,
) -> Evaluation:
    """Every learned point on every image through real files, each classical codec's RD curve on every image,
    and each classical codec at the size of every learned file."""
    from tqdm import tqdm

    learned, curves, matched = [], [], []
    for point in ladders:
        _warm_up(point)
    for name, image in tqdm(images, desc="eval-codec", unit="img", disable=not progress):
        image = rgb_image(image)  # 16-bit scaled, alpha onto white, as training
        pixels = np.asarray(image)
        runs = _ClassicalRuns(name, pixels)
        for point in ladders:
            row = run_learned(point, name, image, runs.reference)
            learned.append(row)
            for codec in classical:
                match = runs.matched(codec, row.bytes)
                match.target, match.target_bytes = f"{point.name}:{point.label}", row.bytes
                matched.append(match)
        for codec in classical:
            for factor in codec.downscale:
                for quality in codec.grid:
                    curves.append(runs.row(codec, quality, factor))
    return Evaluation([name for name, _ in images], learned, curves, matched,
                      classical_settings={codec.name: codec.settings() for codec in classical})


# ---------------------------------------------------------------------------------------------- reports


def machine_description() -> dict:
    """What ran the evaluation: CPU, threads, library versions."""
    import os

    import PIL

    from effvision.codecs.imagefile import available_memory_bytes

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = available_memory_bytes()
    description = {
        "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "available_memory_gb": round(memory / 2**30, 1) if memory else None,
        "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
    }
    if jxl_available():
        from importlib.metadata import version

        description["pillow_jxl_plugin"] = version("pillow-jxl-plugin")
    return description


def _percent(value: float | None) -> str:
    return "n/a (no common PSNR range)" if value is None else f"{100 * value:+.1f}%"


def _decibels(value: float | None) -> str:
    return "n/a (no common rate range)" if value is None else f"{value:+.2f} dB"


def markdown_report(evaluation: Evaluation) -> str:
    """Tables: learned points, classical curves, matched bytes, BD-rate, BD-PSNR."""
    lines = [f"Images: {len(evaluation.images)} ({', '.join(evaluation.images)})", ""]
    for line in evaluation.notes:  # ladders that end early, plugins missing, non-standard MS-SSIM
        lines += [line, ""]
    if evaluation.classical_settings:
        lines += ["Classical encoders (Pillow): " + "; ".join(
            f"{name}: {words}" for name, words in evaluation.classical_settings.items()), ""]
    lines += [
        "### Learned codecs (real `.evc` files, means over images)", "",
        "| codec | setting | bytes | bpp | PSNR (dB) | MS-SSIM | encode MP/s | decode MP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in evaluation.learned_names():
        for p in evaluation.mean_curve(evaluation.learned, name):
            lines.append(f"| {name} | {p['setting']} | {p['bytes']:.0f} | {p['bpp']:.4f} | {p['psnr']:.2f} "
                         f"| {p['ms_ssim']:.4f} | {p['encode_mp_s']:.3f} | {p['decode_mp_s']:.3f} |")
    lines += [
        "", "### Matched bytes (each classical codec at the setting whose file size is closest; means)", "",
        "| learned | classical | learned bytes | classical bytes | learned PSNR | classical PSNR "
        "| PSNR diff (dB) | MS-SSIM diff | no setting within 25% |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in evaluation.matched_summary():
        lines.append(
            f"| {s['learned']} | {s['classical']} | {s['learned_bytes']:.0f} | {s['classical_bytes']:.0f} "
            f"| {s['learned_psnr']:.2f} | {s['classical_psnr']:.2f} | {s['psnr_difference']:+.2f} "
            f"| {s['ms_ssim_difference']:+.4f} | {s['unmatched']}/{s['images']} |"
        )
    lines += [
        "", "### At exactly the same size (classical PSNR interpolated along each photo's curve in log-bytes; "
        "photos where the classical codec has no file that small or that large are left out)", "",
        "| learned | classical | photos inside its range | mean PSNR diff (dB) | learned wins |",
        "|---|---|---:|---:|---:|",
    ]
    for s in evaluation.interpolated_summary():
        difference = "n/a" if s["psnr_difference"] is None else f"{s['psnr_difference']:+.2f}"
        lines.append(f"| {s['learned']} | {s['classical']} | {s['inside']}/{s['images']} | {difference} "
                     f"| {s['wins']}/{s['inside']} |")
    bd = evaluation.bd_rates()
    classical = evaluation.classical_names()
    lines += [
        "", "### BD-rate vs each classical codec (PSNR, piecewise cubic in log-rate; negative = learned saves bits)",
        "", "| learned | " + " | ".join(classical) + " |", "|---|" + "---:|" * len(classical),
    ]
    single = [n for n in evaluation.learned_names() if len(evaluation.mean_curve(evaluation.learned, n)) == 1]

    def rows(table: dict[str, dict[str, float | None]], cell: Callable[[float | None], str]) -> list[str]:
        return [f"| {learned}{' (one point)' if learned in single else ''} | "
                + " | ".join(cell(row[c]) for c in classical) + " |" for learned, row in table.items()]

    lines += rows(bd, _percent)
    lines += [
        "", "### BD-PSNR vs each classical codec (dB at the same rate, piecewise cubic in log-rate; positive = "
        "learned is better; defined wherever the rate ranges overlap)",
        "", "| learned | " + " | ".join(classical) + " |", "|---|" + "---:|" * len(classical),
    ]
    lines += rows(evaluation.bd_psnrs(), _decibels)
    if single:
        lines += ["", "A ladder of one point (marked) has no Bjøntegaard mean: its figures are the differences at "
                  "its own rate (or PSNR) on the classical curve."]
    lines += [
        "", "### Classical RD curves (means over images)", "",
        "| codec | setting | bpp | PSNR (dB) | MS-SSIM | encode MP/s | decode MP/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in classical:
        for p in evaluation.mean_curve(evaluation.curves, name):
            lines.append(f"| {name} | {p['setting']} | {p['bpp']:.4f} | {p['psnr']:.2f} | {p['ms_ssim']:.4f} "
                         f"| {p['encode_mp_s']:.2f} | {p['decode_mp_s']:.2f} |")
    return "\n".join(lines) + "\n"


#: one colour per learned curve, in order (every ladder but the first was drawn in one colour: a VQGAN and its
#: --effort curve could not be told apart); distinct from matplotlib's default cycle of the classical curves
_LEARNED_COLOURS = ("black", "crimson", "darkviolet", "saddlebrown", "teal", "darkorange", "navy", "olive")


def rd_plot(evaluation: Evaluation, path: str | Path, force: bool = True) -> None:
    """PSNR and MS-SSIM vs bpp (log axis): classical curves (Pareto fronts of the means) and learned ladders.
    Written atomically (:func:`effvision.io_utils.atomic_path`); an existing ``path`` only with ``force``."""
    import matplotlib

    from effvision.io_utils import atomic_path, figure_format

    file_format = figure_format(path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    learned_colours = dict(zip(evaluation.learned_names(), _LEARNED_COLOURS * 4, strict=False))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, axis in zip(("psnr", "ms_ssim"), axes, strict=True):
        for name in evaluation.classical_names():
            points = _pareto((p["bpp"], p[metric]) for p in evaluation.mean_curve(evaluation.curves, name))
            axis.plot(*zip(*points, strict=True), marker=".", linewidth=1, label=name)
        for name in evaluation.learned_names():
            points = evaluation.mean_curve(evaluation.learned, name)
            axis.plot([p["bpp"] for p in points], [p[metric] for p in points], marker="o", markersize=8,
                      linewidth=2, color=learned_colours.get(name, "crimson"), label=name)
            for p in points:
                axis.annotate(p["setting"], (p["bpp"], p[metric]), textcoords="offset points", xytext=(5, -10),
                              fontsize=8)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the 2x..9x labels ran together
        axis.set_xlabel("bpp (file bytes)")
        axis.set_ylabel("PSNR (dB)" if metric == "psnr" else "MS-SSIM")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    count = len(evaluation.images)
    figure.suptitle(f"mean over {count} image{'s' if count != 1 else ''}")
    try:
        with atomic_path(path, force=force) as temp:  # a fresh temp name: a fixed one followed planted symlinks
            figure.savefig(temp, format=file_format, dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)


# ------------------------------------------------------------------------------------------ ladder picture


@dataclass
class LadderPanel:
    """One learned file of a ladder picture and the JPEG of (about) the same size beside it."""

    label: str
    learned: Row
    jpeg: Row
    learned_image: Image.Image
    jpeg_image: Image.Image

    @property
    def jpeg_is_smallest(self) -> bool:
        """JPEG cannot make a file that small: its closest file is over the matching tolerance larger."""
        return self.jpeg.bytes > (1 + MATCH_TOLERANCE) * self.learned.bytes


def ladder_panels(image: Image.Image, ladder: Sequence[LearnedCodec], name: str = "image") -> list[LadderPanel]:
    """Every point of ``ladder`` on ``image`` through a real ``.evc`` file, and the JPEG whose size is
    closest to that file (Pillow, quality 1-95): what the ladder picture shows."""
    image = rgb_image(image)  # 16-bit scaled, alpha onto white, as training
    runs = _ClassicalRuns(name, np.asarray(image))
    jpeg = CLASSICAL["jpeg"]
    panels = []
    for point in ladder:
        learned, decoded = coded_learned(point, name, image, runs.reference)
        jpeg_row, jpeg_pixels = runs.coded(jpeg, runs.closest_quality(jpeg, 1, learned.bytes), 1)
        panels.append(LadderPanel(point.label, learned, jpeg_row, decoded, Image.fromarray(jpeg_pixels)))
    return panels


def ladder_picture(original: Image.Image, panels: Sequence[LadderPanel], title: str = "") -> Image.Image:
    """A sheet: the original at the left; for each ladder point a column with the learned decode above and
    JPEG at (about) the same file size below, each captioned with its size (bpp) and PSNR."""
    from PIL import ImageDraw

    width, height = original.size
    caption = 14
    top = caption if title else 0
    sheet = Image.new("RGB", ((1 + len(panels)) * width, top + 2 * (height + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 1), title, fill="black")

    def place(picture: Image.Image, column: int, row: int, text: str) -> None:
        left, y = column * width, top + row * (height + caption)
        sheet.paste(picture, (left, y + caption))
        draw.text((left + 3, y + 1), text, fill="black")

    place(original, 0, 0, f"original {width}x{height}")
    draw.text((3, top + height + caption + 1), "JPEG at the same size ->", fill="black")
    for column, panel in enumerate(panels, start=1):
        learned, jpeg = panel.learned, panel.jpeg
        text = f"{learned.codec} {panel.label}: {learned.bpp:.3f} bpp {learned.psnr:.1f} dB"
        place(panel.learned_image, column, 0, text)
        smallest = "smallest " if panel.jpeg_is_smallest else ""
        text = f"{smallest}JPEG q{jpeg.setting}: {jpeg.bpp:.3f} bpp {jpeg.psnr:.1f} dB"
        place(panel.jpeg_image, column, 1, text)
    return sheet
