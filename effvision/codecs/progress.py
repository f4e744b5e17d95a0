"""Progress bars for long codec work, on standard error: the tiles of an image, the steps of ``--effort``.

Library calls stay silent unless asked: :func:`tiles_bar` takes a flag, and the refinement loops
(:mod:`effvision.codecs.vqgan.refine`, :meth:`effvision.codecs.mambaic.model.MambaIC.refine_latents`) show a bar
only inside :func:`show_refinement_progress`, which ``effvision encode --effort N`` turns on (a 768x512 photo takes
minutes of refinement on a CPU, and a silent terminal looks hung).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SHOW_REFINEMENT = ContextVar("effvision_show_refinement_progress", default=False)


@contextmanager
def show_refinement_progress(show: bool = True) -> Iterator[None]:
    """Within the block, encoder-side refinement shows a bar over its steps (``show=False``: it does not)."""
    token = _SHOW_REFINEMENT.set(show)
    try:
        yield
    finally:
        _SHOW_REFINEMENT.reset(token)


def refinement_steps(steps: int, what: str):
    """``range(steps)``, with a transient bar on stderr inside :func:`show_refinement_progress`."""
    from tqdm import tqdm

    return tqdm(range(steps), desc=what, unit="step", leave=False, file=sys.stderr, mininterval=_min_interval(),
                disable=not _SHOW_REFINEMENT.get() or steps < 2)


def tiles_bar(total: int, what: str, show: bool):
    """A transient bar over ``total`` tiles on stderr, shown when ``show`` and there are several tiles."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="tile", leave=False, disable=not show or total < 2, file=sys.stderr,
                mininterval=_min_interval())


def _min_interval() -> float:
    """Seconds between a bar's updates: tqdm's 0.1 on a terminal, 30 when stderr is a log or a pipe (each update
    is another carriage-return line mixed into the results there)."""
    return 0.1 if sys.stderr.isatty() else 30.0
