"""Command modules of the ``effvision`` CLI, one file per command."""

import argparse
from collections.abc import Callable

#: most --effort steps (about 5 s each on a 768x512 photo here: 1000 is over an hour per image)
MAX_EFFORT = 1000
#: seeds torch and numpy take (torch.manual_seed refuses more than 64 bits)
MAX_SEED = 2**63 - 1


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high``, else argparse's one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse
