"""The one entry point that registers every effvision model name with timm.

``register()`` is idempotent and imports timm (and torch); ``import effvision`` arranges for it to run
when timm is imported, so ``timm.create_model("ppt_deit_small_patch16_224")`` works after
``import effvision`` without the package import itself paying for timm. Each part registers its own
names: token reduction (:mod:`effvision.tokens.registry`) and PEFT (:mod:`effvision.peft.registry`).

timm's scripts (``train.py``, ``validate.py``, ``benchmark.py``) do not import effvision; run them through
this module, which registers the names first::

    python -m effvision.timm_models validate.py /data/imagenet --model ppt_deit_small_patch16_224 --device cpu
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

USAGE = "usage: python -m effvision.timm_models SCRIPT.py [SCRIPT ARGUMENTS...]\n\n" \
        "Runs a timm script (train.py, validate.py, benchmark.py, ...) with effvision's model names registered."


def register() -> list[str]:
    """Register all ``<method>_<timm name>`` entries (token reduction and PEFT); returns the names."""
    # The first import of timm runs effvision's hook, i.e. this function, inside it: import timm before anything
    # is registered, so that the first name is not registered twice (timm warned "Overwriting ...").
    import timm  # noqa: F401

    from effvision.peft.registry import register_peft_models
    from effvision.tokens.registry import register_reduced_models

    return register_reduced_models() + register_peft_models()


def run_script(argv: list[str]) -> int:
    """Run the script ``argv[0]`` as ``__main__`` with arguments ``argv[1:]``, effvision's names registered."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if not Path(argv[0]).is_file():
        print(f"error: no script {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    register()
    sys.argv = list(argv)
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as `python SCRIPT.py` does
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(sys.argv[1:]))
