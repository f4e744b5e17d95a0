"""Pick token-reduction settings for a speed target on the device at hand (``effvision tune``).

For each method (``ppt``, ``tome``, ``topk``) the settings form a one-dimensional family ordered by
MACs: ToMe ``r`` (same r every block), PPT ``r`` at the reduction blocks, top-k ``keep_rate``. The
search runs on that line:

1. MACs of every setting come from the analytic count (:func:`effvision.reduction_info`) on a
   parameter-free copy of the model, so no setting is timed just to learn how much it removes.
2. A one-parameter time model, ``time ratio = a + (1 - a) * MACs ratio`` (``a``: the share of the time
   that does not shrink with the tokens), fitted to what has been measured so far, proposes the setting
   whose speed-up should just meet the target. Measured settings bracket the answer (slower than the
   target below, meeting it above); a proposal outside the bracket falls back to bisection.
3. Timing is robust to a shared, noisy machine: the unreduced model and this step's candidates (one per
   method) run in turn, round after round, and a candidate's speed-up is the median over rounds of
   (unreduced time / candidate time) from the same round. Settings close to the target get extra rounds.
4. Fidelity to the unreduced model on calibration images: top-1 agreement and
   KL(unreduced || reduced) of the softmax outputs. Per method the pick is the measured setting that
   meets the target with the highest agreement; agreements within one binomial standard error of the
   best (about 6 points on 32 images) are not told apart, and among those the least reduction wins (then
   the lowest KL), so calibration noise does not trade speed-up for nothing. For PPT the score-variance
   threshold changes which images are pooled or pruned but not the work done (both are computed), so
   the thresholds are compared at the picked ``r`` on fidelity alone (lowest KL among equal agreements).
   The best pick over the methods: highest agreement, then lowest KL.
5. The picks are timed again together against the unreduced model (more rounds): that is the speed-up
   reported as re-measured. A pick chosen at the boundary tends to have had lucky rounds; one whose
   search and re-measurement rounds together fall short of the target does not compete for the best pick.

The written config (:meth:`TuneResult.config`) is JSON::

    {"format": "effvision-tune/1",
     "model": "ppt_deit_small_patch16_224",       # registered timm name, or null for other bases
     "kwargs": {"r": 31, "layers": [3, 6, 9], "threshold": 7e-05},
     "method": "ppt", "base_model": "deit_small_patch16_224",
     "options": {...},                             # method options only, for effvision.reduce
     "measured": {...}, "per_method": {...}, "candidates": [...], ...}

``timm.create_model(cfg["model"], **cfg["kwargs"])``,
``effvision.create_reduced_model(cfg["method"], cfg["base_model"], **cfg["kwargs"])`` and
``effvision.reduce(model, cfg["method"], **cfg["options"])`` all accept it (see :func:`model_from_config`).
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import effvision
from effvision.bounded_config import check_float32_fits

CONFIG_FORMAT = "effvision-tune/1"
METHODS = ("ppt", "tome", "topk")
#: PPT score-variance thresholds compared at the picked r: always prune, the paper's 7e-5 around x2, always pool.
PPT_THRESHOLDS = (7e-5, 0.0, 3.5e-5, 1.4e-4, 1.0)
#: top-k keep rates tried (the grid keeps one rate per distinct token schedule).
TOPK_KEEP_RATES = tuple(round(1.0 - 0.01 * step, 2) for step in range(96))


@dataclass(frozen=True)
class Target:
    """A speed-up (``"1.8x"``) or a latency per batch (``"120ms"``, ``"0.5s"``)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        if isinstance(text, Target):
            return text
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(x|ms|s)\s*", str(text).lower())
        if not match:
            raise ValueError(f"target {text!r}: give a speed-up like '1.8x' or a latency per batch like '120ms'")
        number, unit = float(match.group(1)), match.group(2)
        if number <= 0:
            raise ValueError(f"target {text!r} must be positive")
        if unit == "x":
            if number <= 1:  # the unreduced model meets it: the search would pick "no reduction"
                raise ValueError(f"target {text!r}: a speed-up must be above 1x (1x is the unreduced model)")
            return cls("speedup", number)
        return cls("latency", number / 1000.0 if unit == "ms" else number)

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.kind == "speedup" else f"{self.value * 1000:g}ms per batch"

    def required_speedup(self, base_seconds: float) -> float:
        """The speed-up over the unreduced model that meets the target (latency: from its measured time)."""
        return self.value if self.kind == "speedup" else base_seconds / self.value

    def met_by(self, candidate: Candidate, pooled: bool = False) -> bool:
        """Whether the candidate's search timing (``pooled``: search and re-measurement rounds together)
        meets the target."""
        speedup, seconds = (candidate.pooled_speedup, candidate.pooled_seconds) if pooled else (
            candidate.speedup, candidate.seconds)
        if speedup is None:
            return False
        return speedup >= self.value if self.kind == "speedup" else seconds <= self.value


@dataclass(eq=False)
class Candidate:
    """One setting of one method, with what was computed and measured for it (compared by identity)."""

    method: str
    options: dict
    macs_ratio: float
    gmacs: float
    final_tokens: int
    base_times: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    top1_agreement: float | None = None
    kl: float | None = None
    timed_as: Candidate | None = None  # a PPT threshold variant shares the timing of its r
    final_base_times: list[float] = field(default_factory=list)
    final_times: list[float] = field(default_factory=list)

    @property
    def setting(self) -> str:
        return ", ".join(f"{key}={_format_option(value)}" for key, value in self.options.items())

    def _timing(self) -> Candidate:
        return self.timed_as if self.timed_as is not None else self

    @property
    def speedup(self) -> float | None:
        """Median over rounds of unreduced time / this time (same round)."""
        timing = self._timing()
        return _paired_speedup(timing.base_times, timing.times)

    @property
    def seconds(self) -> float | None:
        times = self._timing().times
        return statistics.median(times) if times else None

    @property
    def final_speedup(self) -> float | None:
        return _paired_speedup(self.final_base_times, self.final_times)

    @property
    def final_seconds(self) -> float | None:
        return statistics.median(self.final_times) if self.final_times else None

    @property
    def pooled_speedup(self) -> float | None:
        """Median over the search's and the re-measurement's rounds together."""
        timing = self._timing()
        return _paired_speedup(timing.base_times + self.final_base_times, timing.times + self.final_times)

    @property
    def pooled_seconds(self) -> float | None:
        times = self._timing().times + self.final_times
        return statistics.median(times) if times else None

    def record(self) -> dict:
        return {
            "method": self.method,
            "options": _jsonable(self.options),
            "macs_ratio": round(self.macs_ratio, 4),
            "gmacs": round(self.gmacs, 4),
            "final_tokens": self.final_tokens,
            "speedup": _round(self.speedup, 4),
            "seconds_per_batch": _round(self.seconds, 5),
            "rounds": len(self._timing().times),
            "remeasured_speedup": _round(self.final_speedup, 4),
            "remeasured_seconds_per_batch": _round(self.final_seconds, 5),
            "pooled_speedup": _round(self.pooled_speedup, 4),
            "top1_agreement": _round(self.top1_agreement, 4),
            "kl": _round(self.kl, 6),
        }


def _paired_speedup(base_times: Sequence[float], times: Sequence[float]) -> float | None:
    if not times:
        return None
    return statistics.median(base / cand for base, cand in zip(base_times, times, strict=True))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _format_option(value) -> str:
    if isinstance(value, (tuple, list)):
        return "/".join(str(item) for item in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _jsonable(options: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}


def agreement_margin(agreement: float, samples: int) -> float:
    """One binomial standard error of a top-1 agreement measured on ``samples`` images (at least 1/samples):
    agreements closer than this are not told apart."""
    return max(math.sqrt(agreement * (1 - agreement) / samples), 1 / samples)


def most_faithful(candidates: Sequence[Candidate], samples: int, prefer: Callable[[Candidate], tuple]) -> Candidate:
    """The candidate with the highest top-1 agreement, where agreements within :func:`agreement_margin` of the
    best count as equal and ``prefer`` (largest wins) decides between them."""
    top = max(candidate.top1_agreement for candidate in candidates)
    near = [c for c in candidates if c.top1_agreement >= top - agreement_margin(top, samples) - 1e-12]
    return max(near, key=prefer)


def pick_setting(candidates: Sequence[Candidate], target: Target, samples: int) -> Candidate | None:
    """Of the timed candidates that meet ``target``, the most faithful (:func:`most_faithful`; among
    agreements equal up to the calibration noise: the least reduction, then the lowest KL); ``None`` when
    none meets the target."""
    meeting = [c for c in candidates if c.times and target.met_by(c)]
    if not meeting:
        return None
    return most_faithful(meeting, samples, prefer=lambda c: (c.macs_ratio, -c.kl))


# ----------------------------------------------------------------------------------------------- grid


def _reduced_copy(model: nn.Module, method: str, options: dict) -> nn.Module:
    return effvision.reduce(copy.deepcopy(model), method, **options).eval()


def candidate_grid(model: nn.Module, method: str) -> list[Candidate]:
    """Settings of ``method`` for ``model``, one per distinct token schedule, least reduction first.

    ToMe: r = 0, 1, ... (every block). Top-k: keep rates 1.0 down to 0.05 at the default blocks (a quarter,
    half and three quarters of the depth). PPT: r = 0, 1, ... at the default blocks, then, for more
    reduction than those allow, the same blocks moved one and two blocks earlier. MACs are counted on a
    parameter-free (meta-device) copy, so this costs no compute."""
    skeleton = copy.deepcopy(model).to("meta")
    depth = len(skeleton.blocks)
    patches = skeleton.patch_embed.num_patches
    layers = tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))
    if method == "tome":
        families = [[{"r": r} for r in range(patches // 2 + 1)]]
    elif method == "ppt":
        shifted = [tuple(sorted({max(layer - shift, 0) for layer in layers})) for shift in (0, 1, 2)]
        families = [
            [{"r": r, "layers": blocks, "threshold": PPT_THRESHOLDS[0]} for r in range(patches // 2 + 1)]
            for blocks in dict.fromkeys(shifted)
        ]
    elif method == "topk":
        families = [[{"keep_rate": rate, "layers": layers} for rate in TOPK_KEEP_RATES]]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    grid: list[Candidate] = []
    seen: set[tuple[int, ...]] = set()
    first_error = None
    for family in families:
        least_macs = min((candidate.macs_ratio for candidate in grid), default=math.inf)
        for options in family:
            try:
                info = effvision.reduction_info(effvision.reduce(copy.deepcopy(skeleton), method, **options))
            except ValueError as error:
                first_error = first_error or error
                continue  # e.g. r beyond what the schedule allows: the family ends there
            schedule = tuple(info["tokens"]) + tuple(info["tokens_after"])
            if schedule in seen or info["macs_ratio"] >= least_macs:
                continue
            seen.add(schedule)
            grid.append(Candidate(method, options, info["macs_ratio"], info["gmacs"], info["tokens_after"][-1]))
    if not grid:
        raise ValueError(f"{method} does not apply to this model: {first_error}")
    grid.sort(key=lambda candidate: -candidate.macs_ratio)
    return grid


# ---------------------------------------------------------------------------------------------- timing


class TorchTimer:
    """Times one batch of random images through a PyTorch model on ``device`` (autocast for bf16/fp16).

    ``prepare(model)`` returns a zero-argument function that runs one batch and returns its seconds.
    """

    def __init__(self, input_size: Sequence[int], batch_size: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, warmup: int = 1) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.warmup = warmup
        self.images = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(device)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, model: nn.Module) -> Callable[[], float]:
        autocast = self.dtype != torch.float32

        def run_once() -> float:
            self._synchronize()
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
                model(self.images)
            self._synchronize()
            return time.perf_counter() - start

        for _ in range(self.warmup):
            run_once()
        return run_once


class OnnxTimer:
    """Times one batch through ONNX Runtime (CPU): each model is exported to a temporary ``.onnx`` file."""

    def __init__(self, input_size: Sequence[int], batch_size: int, workdir: str | Path, warmup: int = 1,
                 threads: int | None = None) -> None:
        self.input_size = tuple(input_size)
        self.images = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))
        self.workdir = Path(workdir)
        self.warmup = warmup
        self.threads = threads
        self._count = 0

    def prepare(self, model: nn.Module) -> Callable[[], float]:
        from effvision.export import OrtModel, export_onnx

        self._count += 1
        path = export_onnx(model, self.workdir / f"candidate-{self._count}.onnx", (1, *self.input_size))
        session = OrtModel(path, threads=self.threads)
        images = self.images.numpy()

        def run_once() -> float:
            start = time.perf_counter()
            session(images)
            return time.perf_counter() - start

        for _ in range(self.warmup):
            run_once()
        return run_once


def timed_rounds(base_run: Callable[[], float], candidates: dict[Candidate, Callable[[], float]], rounds: int,
                 final: bool = False) -> list[float]:
    """Run the unreduced model then every candidate, ``rounds`` times; append the seconds to each candidate
    (paired with the unreduced time of the same round). Returns the unreduced model's times."""
    base_times = []
    for _ in range(rounds):
        base_seconds = base_run()
        base_times.append(base_seconds)
        for candidate, run in candidates.items():
            seconds = run()
            if final:
                candidate.final_base_times.append(base_seconds)
                candidate.final_times.append(seconds)
            else:
                candidate.base_times.append(base_seconds)
                candidate.times.append(seconds)
    return base_times


# ---------------------------------------------------------------------------------------------- search


def fit_fixed_share(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares ``a`` in ``1 / speedup = a + (1 - a) * macs_ratio`` from (macs_ratio, speedup) points."""
    numerator = sum((1 - macs) * (1 / speed - macs) for macs, speed in points)
    denominator = sum((1 - macs) ** 2 for macs, _ in points)
    if denominator < 1e-9:
        return 0.0
    # a noisy point must not make the model absurd (a > 0.6 would send the next proposal to the grid's end)
    return min(max(numerator / denominator, -0.3), 0.6)


class MethodSearch:
    """Bracketing search over one method's grid (index 0: least reduction) for the least-reduced
    setting that meets the target."""

    def __init__(self, grid: list[Candidate], max_steps: int, close: float) -> None:
        self.grid = grid
        self.max_steps = max_steps
        self.close = close
        self.failing = -1  # highest index measured too slow
        self.passing = len(grid)  # lowest index measured meeting the target
        self.steps = 0

    @property
    def measured(self) -> list[Candidate]:
        return [candidate for candidate in self.grid if candidate.times]

    @property
    def unreachable(self) -> bool:
        return self.failing == len(self.grid) - 1

    def done(self, required_speedup: float) -> bool:
        if self.steps >= self.max_steps or self.passing - self.failing <= 1:
            return True
        best = self.grid[self.passing] if self.passing < len(self.grid) else None
        return best is not None and best.speedup <= required_speedup * (1 + self.close)

    def update(self, candidate: Candidate, target: Target) -> None:
        index = self.grid.index(candidate)
        if target.met_by(candidate):
            self.passing = min(self.passing, index)
        else:
            self.failing = max(self.failing, index)
        if self.failing >= self.passing:  # noise made the measurements cross: trust the newest one
            if target.met_by(candidate):
                self.failing = index - 1
            else:
                self.passing = index + 1

    def propose(self, required_speedup: float, fixed_share: float) -> Candidate | None:
        """The next setting to time: where the time model puts the target, kept inside the bracket."""
        aim = required_speedup * (1 + self.close / 2)
        macs_needed = (1 / aim - fixed_share) / (1 - fixed_share)
        if self.failing >= 0 and self.passing == len(self.grid):
            # nothing meets the target yet: step towards more reduction by at most 30% of the MACs at a time
            macs_needed = max(macs_needed, 0.7 * self.grid[self.failing].macs_ratio)
        index = next((i for i, c in enumerate(self.grid) if c.macs_ratio <= macs_needed), len(self.grid) - 1)
        if self.passing < len(self.grid):
            # bracketed: stay out of the outer quarters, so that every step shrinks the bracket by a quarter
            quarter = -(-(self.passing - self.failing) // 4)
            index = min(max(index, self.failing + quarter), self.passing - quarter)
        if not self.failing < index < self.passing:
            index = min(max(index, self.failing + 1), self.passing - 1)
        if self.grid[index].times:
            index = (self.failing + self.passing) // 2
        if not self.failing < index < self.passing or self.grid[index].times:
            return None
        self.steps += 1
        return self.grid[index]


# -------------------------------------------------------------------------------------------- fidelity


@torch.inference_mode()
def model_logits(model: nn.Module, images: Tensor, batch_size: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Float32 CPU logits of ``images`` (on the CPU), run in batches on ``device`` under ``dtype`` autocast."""
    device = torch.device(device)
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs)


def fidelity(reference_logits: Tensor, logits: Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || reduced)) between two (N, classes) logit tensors."""
    agreement = (reference_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    reference = F.log_softmax(reference_logits.float(), -1)
    reduced = F.log_softmax(logits.float(), -1)
    kl = F.kl_div(reduced, reference, log_target=True, reduction="batchmean").item()
    return agreement, max(kl, 0.0)


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class TuneResult:
    """What :func:`tune` found: every candidate timed, the pick per method and the best pick."""

    target: Target
    base_model: str
    model_kwargs: dict
    device: str
    dtype: str
    batch_size: int
    runtime: str
    calibration: str
    candidates: list[Candidate]
    picks: dict[str, Candidate | None]
    base_seconds: float
    final_base_seconds: float | None
    elapsed_seconds: float
    best: Candidate | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def config(self, candidate: Candidate | None = None) -> dict:
        """The JSON config for ``candidate`` (default: the best pick), with every method's pick beside it."""
        candidate = candidate or self.best
        if candidate is None:
            raise ValueError(f"no method met the target {self.target}")
        registered = f"{candidate.method}_{self.base_model}"
        return {
            "format": CONFIG_FORMAT,
            "model": registered if _is_registered(registered) else None,
            "kwargs": {**self.model_kwargs, **_jsonable(candidate.options)},
            "method": candidate.method,
            "base_model": self.base_model,
            "options": _jsonable(candidate.options),
            "target": str(self.target),
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "runtime": self.runtime,
            "calibration": self.calibration,
            "measured": candidate.record(),
            "unreduced_seconds_per_batch": round(self.final_base_seconds or self.base_seconds, 5),
            "per_method": {
                method: (self._method_entry(pick) if pick is not None else None) for method, pick in self.picks.items()
            },
            "candidates": [c.record() for c in self.candidates],
            "elapsed_seconds": round(self.elapsed_seconds, 1),
        }

    def _method_entry(self, pick: Candidate) -> dict:
        registered = f"{pick.method}_{self.base_model}"
        return {
            "model": registered if _is_registered(registered) else None,
            "kwargs": {**self.model_kwargs, **_jsonable(pick.options)},
            "options": _jsonable(pick.options),
            "measured": pick.record(),
        }

    def table(self) -> str:
        """A text table: one row per method (its pick, or why there is none)."""
        header = (f"{'method':<6} {'setting':<36} {'GMACs':>6} {'MACs':>6} {'tokens':>6} {'speed-up':>9} "
                  f"{'re-measured':>11} {'ms/batch':>9} {'top-1 agree':>11} {'KL':>8}")
        lines = [header, "-" * len(header)]
        for method, pick in self.picks.items():
            if method in self.notes:
                lines.append(f"{method:<6} {self.notes[method]}")
                continue
            if pick is None:
                fastest = max((c for c in self.candidates if c.method == method and c.speedup),
                              key=lambda c: c.speedup, default=None)
                reason = (f"target not met (fastest timed: {fastest.speedup:.2f}x at {fastest.setting})"
                          if fastest else "target not met")
                lines.append(f"{method:<6} {reason}")
                continue
            final = f"{pick.final_speedup:.2f}x" if pick.final_speedup else "-"
            milliseconds = (pick.final_seconds or pick.seconds) * 1000
            marker = " *" if pick is self.best else ""
            lines.append(
                f"{method:<6} {pick.setting:<36} {pick.gmacs:>6.2f} {pick.macs_ratio:>5.2f}x {pick.final_tokens:>6d} "
                f"{pick.speedup:>8.2f}x {final:>11} {milliseconds:>9.1f} {pick.top1_agreement:>10.1%} "
                f"{pick.kl:>8.4f}{marker}"
            )
        short = [method for method, pick in self.picks.items()
                 if pick is not None and pick.final_times and not self.target.met_by(pick, pooled=True)]
        if short:
            lines.append(f"note: with the re-measurement pooled in, {', '.join(short)} fell short of the target "
                         "(so the best pick is chosen among the others, if any)")
        drifted = [method for method, pick in self.picks.items()
                   if pick is not None and pick.final_speedup and abs(pick.final_speedup / pick.speedup - 1) > 0.15]
        if drifted:
            lines.append(f"note: re-measured speed-up of {', '.join(drifted)} differs from the search's by more than "
                         "15%: the machine's load changed while measuring (rerun when it is quieter, with more "
                         "--repeats, or with --threads 1 on a busy CPU)")
        base_ms = (self.final_base_seconds or self.base_seconds) * 1000
        lines.append(f"unreduced {self.base_model}: {base_ms:.1f} ms per batch of {self.batch_size} "
                     f"({self.device}, {self.dtype}, {self.runtime}); * = best pick; speed-up = median of paired "
                     f"rounds; fidelity on {self.calibration}")
        return "\n".join(lines)

    def plot(self, path: str | Path, force: bool = True) -> Path:
        """Fidelity (top-1 agreement, KL) vs measured speed-up of every timed candidate, target marked (PNG);
        ``force=False`` refuses to replace an existing ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from effvision.io_utils import atomic_path, figure_format

        required = self.target.required_speedup(self.base_seconds)
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        for method in self.picks:
            points = sorted((c for c in self.candidates if c.method == method and c.times and c.kl is not None),
                            key=lambda c: c.speedup)
            if not points:
                continue
            speeds = [c.speedup for c in points]
            line = top.plot(speeds, [100 * c.top1_agreement for c in points], "o-", label=method)[0]
            bottom.plot(speeds, [c.kl for c in points], "o-", color=line.get_color(), label=method)
            variants = [c for c in self.candidates if c.method == method and c.timed_as is not None]
            if variants:  # PPT thresholds at the picked r: same work, same speed
                top.plot([c.speedup for c in variants], [100 * c.top1_agreement for c in variants], "x",
                         color=line.get_color())
                bottom.plot([c.speedup for c in variants], [c.kl for c in variants], "x", color=line.get_color())
            pick = self.picks[method]
            if pick is not None:
                speed = pick.final_speedup or pick.speedup
                top.plot([speed], [100 * pick.top1_agreement], "*", markersize=16, color=line.get_color())
                bottom.plot([speed], [pick.kl], "*", markersize=16, color=line.get_color())
        for axis in (top, bottom):
            axis.axvline(required, color="gray", linestyle="--", label=f"target {self.target}")
            axis.grid(alpha=0.3)
        top.set_ylabel("top-1 agreement with unreduced (%)")
        bottom.set_ylabel("KL(unreduced || reduced)")
        bottom.set_xlabel(f"measured speed-up over {self.base_model} ({self.device}, {self.dtype}, batch "
                          f"{self.batch_size})")
        top.legend()
        top.set_title(f"effvision tune: {self.base_model}, target {self.target}\n"
                      "(stars: picks, re-measured; x: PPT thresholds at the picked r)", fontsize=10)
        figure.tight_layout()
        path = Path(path)
        with atomic_path(path, force=force) as temp_name:
            figure.savefig(temp_name, format=figure_format(path), dpi=110)
        plt.close(figure)
        return path


def _is_registered(name: str) -> bool:
    import timm

    return timm.is_model(name)


def tune(
    model: nn.Module,
    target: Target | str,
    images: Tensor,
    timer,
    *,
    methods: Sequence[str] = METHODS,
    base_model: str = "model",
    model_kwargs: dict | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
    runtime: str = "pytorch",
    calibration: str = "",
    repeats: int = 3,
    extra_repeats: int = 2,
    final_repeats: int = 5,
    max_steps: int = 6,
    close: float = 0.05,
    log: Callable[[str], None] = lambda message: None,
) -> TuneResult:
    """Search each method's settings for the target on ``timer``'s device; see the module docstring.

    Args:
        model: the unreduced timm VisionTransformer, in eval mode on ``device``.
        target: ``Target`` or its text (``"1.8x"``, ``"120ms"``).
        images: calibration images (N, 3, H, W), normalised for the model, on the CPU.
        timer: has ``prepare(model) -> run_once() -> seconds`` (:class:`TorchTimer`, :class:`OnnxTimer`).
        methods: the methods to tune.
        base_model / model_kwargs: the timm name and kwargs the config will rebuild the model with.
        device / dtype / batch_size: where and how fidelity is computed (and what the report says).
        repeats: timed rounds per search step; ``extra_repeats`` more for settings near the target.
        final_repeats: rounds for the re-measurement of the picks.
        max_steps: timed settings per method at most.
        close: a setting meeting the target by less than this fraction ends its method's search.
        log: receives one line per step.
    """
    started = time.perf_counter()
    target = Target.parse(target)
    model = model.eval()
    grids: dict[str, list[Candidate]] = {}
    notes: dict[str, str] = {}
    for method in methods:
        try:
            grids[method] = candidate_grid(model, method)
        except ValueError as error:
            grids[method], notes[method] = [], str(error)
            log(f"  {method}: {error}")
    searches = {method: MethodSearch(grid, max_steps, close) for method, grid in grids.items()}
    base_run = timer.prepare(model)
    base_times: list[float] = [base_run() for _ in range(max(1, repeats // 2))]

    def required() -> float:
        return target.required_speedup(statistics.median(base_times))

    while True:
        every_point = [(c.macs_ratio, c.speedup) for s in searches.values() for c in s.measured]
        proposals = {}
        for method, search in searches.items():
            if search.done(required()):
                continue
            own = [(c.macs_ratio, c.speedup) for c in search.measured]
            candidate = search.propose(required(), fit_fixed_share(own or every_point))
            if candidate is not None:
                proposals[candidate] = timer.prepare(_reduced_copy(model, method, candidate.options))
        if not proposals:
            break
        base_times += timed_rounds(base_run, proposals, repeats)
        near = {c: run for c, run in proposals.items() if abs(c.speedup / required() - 1) < close}
        if near and extra_repeats:
            base_times += timed_rounds(base_run, near, extra_repeats)
        for candidate in proposals:
            searches[candidate.method].update(candidate, target)
            log(f"  {candidate.method:<5} {candidate.setting:<36} MACs {candidate.macs_ratio:.2f}x -> "
                f"{candidate.speedup:.2f}x ({len(candidate.times)} rounds, {candidate.seconds * 1000:.0f} ms)"
                f"{'  meets target' if target.met_by(candidate) else ''}")
        del proposals

    samples = images.shape[0]
    base_logits = model_logits(model, images, batch_size, device, dtype)
    timed = [c for grid in grids.values() for c in grid if c.times]
    for candidate in timed:
        reduced = _reduced_copy(model, candidate.method, candidate.options)
        candidate.top1_agreement, candidate.kl = fidelity(base_logits, model_logits(reduced, images, batch_size,
                                                                                      device, dtype))
    picks: dict[str, Candidate | None] = {}
    extra: list[Candidate] = []
    for method in methods:
        pick = pick_setting(grids[method], target, samples)
        if pick is not None and method == "ppt":
            variants = [pick]
            for threshold in PPT_THRESHOLDS[1:]:
                variant = Candidate(method, {**pick.options, "threshold": threshold}, pick.macs_ratio, pick.gmacs,
                                    pick.final_tokens, timed_as=pick)
                reduced = _reduced_copy(model, method, variant.options)
                variant.top1_agreement, variant.kl = fidelity(base_logits, model_logits(reduced, images, batch_size,
                                                                                          device, dtype))
                variants.append(variant)
            extra += variants[1:]
            pick = most_faithful(variants, samples, prefer=lambda c, first=pick: (-c.kl, c is first))
        picks[method] = pick

    chosen = [pick for pick in picks.values() if pick is not None]
    final_base_seconds = None
    if chosen and final_repeats:
        log(f"re-measuring the picks against the unreduced model ({final_repeats} rounds)")
        runs = {pick: timer.prepare(_reduced_copy(model, pick.method, pick.options)) for pick in chosen}
        timed_rounds(base_run, runs, final_repeats, final=True)
        final_base_seconds = statistics.median(chosen[0].final_base_times)
    # the search's pass/fail at the boundary favours lucky rounds; with the re-measurement pooled in, a pick
    # that falls short no longer competes for best (unless none holds up)
    confirmed = [pick for pick in chosen if target.met_by(pick, pooled=True)] or chosen
    best = most_faithful(confirmed, samples, prefer=lambda c: (-c.kl, c.pooled_speedup)) if chosen else None
    candidates = sorted(timed + extra, key=lambda c: (methods.index(c.method), -c.macs_ratio))
    return TuneResult(
        target=target,
        base_model=base_model,
        model_kwargs=dict(model_kwargs or {}),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        batch_size=batch_size,
        runtime=runtime,
        calibration=calibration,
        candidates=candidates,
        picks=picks,
        base_seconds=statistics.median(base_times),
        final_base_seconds=final_base_seconds,
        elapsed_seconds=time.perf_counter() - started,
        best=best,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------- calibration


def _resize_center_crop(image: Tensor, size: int, crop_pct: float) -> Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size): shorter side to size / crop_pct, centre crop (timm's eval).

    An image longer than :data:`MAX_ASPECT_RESIZED` times the crop once resized has only the central part the
    crop covers (and a margin for the filter) resized, at very nearly the same scale: resizing the whole of a
    1x4000 image to a short side of 256 made 256x1024000 pixels (3.7 GB) to keep 224x224."""
    height, width = image.shape[-2:]
    scale = size / crop_pct / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if max(new_h, new_w) > MAX_ASPECT_RESIZED * size:
        covered = math.ceil(size / scale) + 4
        crop_h, crop_w = min(height, covered), min(width, covered)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image[:, top:top + crop_h, left:left + crop_w]
        new_h, new_w = max(size, round(crop_h * scale)), max(size, round(crop_w * scale))
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[0, :, top:top + size, left:left + size]


#: longest side, in crops, that :func:`_resize_center_crop` resizes whole
MAX_ASPECT_RESIZED = 8


def _random_crop(image: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A random crop of 25-100% of the area, aspect 3/4-4/3, flipped half the time, resized to size."""
    height, width = image.shape[-2:]
    area = height * width * (0.25 + 0.75 * torch.rand((), generator=generator).item())
    aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand((), generator=generator).item())
    crop_h = min(height, max(8, round(math.sqrt(area / aspect))))
    crop_w = min(width, max(8, round(math.sqrt(area * aspect))))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
    crop = image[:, top:top + crop_h, left:left + crop_w]
    if torch.rand((), generator=generator).item() < 0.5:
        crop = crop.flip(-1)
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _read_images(files: Sequence[Path]) -> list[Tensor]:
    """(3, H, W) float tensors in [0, 1], through effvision's one image reader (alpha onto white)."""
    from effvision.image_io import load_image

    return [load_image(path) for path in files]


def builtin_photos() -> list[Tensor]:
    """Real photos shipped with scikit-image (if installed), else effvision's own astronaut; (3, H, W) in [0, 1]."""
    try:
        import skimage.data
    except ImportError:
        from importlib import resources

        return _read_images([Path(str(resources.files("effvision") / "assets" / "astronaut-256.png"))])
    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download is simply left out
            continue
        photos.append(torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1).float() / 255.0)
    return photos


def _check_calibration_memory(count: int, size: int) -> None:
    """The calibration set is held in memory (float32): refuse one larger than a quarter of this machine's."""
    from effvision.bounded_config import physical_memory_bytes

    fitting = physical_memory_bytes() // 4 // (3 * size * size * 4)
    check_float32_fits((count, 3, size, size), f"{count} calibration images of {size}x{size} (about {fitting} fit)")


def calibration_images(data_config: dict, count: int = 32, folder: str | Path | None = None,
                       seed: int = 0) -> tuple[Tensor, str]:
    """``count`` calibration images, normalised as the model expects, and a description of them.

    Args:
        data_config: timm's data config of the model (``input_size``, ``mean``, ``std``, ``crop_pct``).
        count: number of images (a folder gives at most its own number of images).
        folder: image files (searched recursively); ``None``: random crops and flips of built-in photos.
    """
    from effvision.image_io import list_images

    size = data_config["input_size"][-1]
    if folder is not None:
        files = list_images(folder)[:count]
        _check_calibration_memory(len(files), size)
        crop_pct = data_config.get("crop_pct", 0.875)
        images = [_resize_center_crop(image, size, crop_pct) for image in _read_images(files)]
        description = f"{len(images)} images from {folder}"
    else:
        _check_calibration_memory(count, size)
        photos = builtin_photos()
        generator = torch.Generator().manual_seed(seed)
        images = [_random_crop(photos[i % len(photos)], size, generator) for i in range(count)]
        description = f"{count} crops/flips of {len(photos)} built-in photos"
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    return torch.stack([(image.clamp(0, 1) - mean) / std for image in images]), description


# ------------------------------------------------------------------------------------------------ config


#: a tune config: a few hundred candidates take a few hundred kB
MAX_CONFIG_BYTES = 16 * 2**20


def load_config(path: str | Path) -> dict:
    """Read a config written by ``effvision tune`` (checks its size, JSON and format tag; a :class:`ValueError`)."""
    from effvision.errors import UserError
    from effvision.io_utils import read_bytes

    try:  # the project's bounded read: a regular file of at most MAX_CONFIG_BYTES (a FIFO would block read_text)
        text = read_bytes(path, MAX_CONFIG_BYTES).decode("utf-8")
    except UserError as error:
        raise ValueError(f"{error}; not an effvision tune config") from error
    try:
        config = json.loads(text)
    except RecursionError as error:  # "[[[[...]]]]" a few thousand deep: json's decoder recurses per level
        raise ValueError(f"{path}: its JSON nests too deeply; not an effvision tune config") from error
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: not an effvision tune config (format {found!r})")
    return config


def model_from_config(config: dict | str | Path) -> nn.Module:
    """The token-reduced model a tune config describes (any timm ViT base, registered or not). A config may come
    from anywhere, so its model options are bounded first (:func:`effvision.bounded_config.check_timm_options`)."""
    from effvision.bounded_config import check_timm_options

    if not isinstance(config, dict):
        config = load_config(config)
    method, base, kwargs = config.get("method"), config.get("base_model"), config.get("kwargs")
    if not isinstance(method, str) or not isinstance(base, str) or not isinstance(kwargs, dict):
        raise ValueError("a tune config needs 'method' and 'base_model' strings and a 'kwargs' object")
    check_timm_options(kwargs)
    return effvision.create_reduced_model(method, base, **kwargs)
