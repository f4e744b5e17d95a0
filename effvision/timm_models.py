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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from effvision.errors import UserError

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


def weights_download_error(model_name: str, error: BaseException) -> UserError | None:
    """A :class:`~effvision.errors.UserError` that says which file timm could not fetch for ``model_name``'s
    pretrained weights, and what to do offline, when ``error`` is a download failure (Hugging Face Hub errors,
    network and file-system errors); ``None`` for any other error (a wrong argument, a shape mismatch)."""
    from effvision.errors import UserError

    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        hub_errors: tuple = (HfHubHTTPError, LocalEntryNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
        hub_errors = ()
    network = any(word in type(error).__name__ for word in ("Connect", "Timeout", "HTTP"))
    if not (isinstance(error, (OSError, *hub_errors)) or network):
        return None
    import timm

    cfg = timm.get_pretrained_cfg(model_name.split(".")[0]) if "/" not in model_name else None
    source = (f"{cfg.hf_hub_id} on the Hugging Face Hub" if cfg is not None and cfg.hf_hub_id
              else (cfg.url if cfg is not None and cfg.url else "its hub repository"))
    return UserError(
        f"could not get the pretrained weights of {model_name} from {source} ({type(error).__name__}: "
        f"{str(error)[:300]}). Offline: fetch them where there is a network (`huggingface-cli download "
        f"{cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else '<repo>'}`) and copy the Hugging Face cache "
        "(~/.cache/huggingface/hub, or $HF_HOME), set HF_HUB_OFFLINE=1 to skip the retries, or pass the weights "
        "file with --checkpoint FILE"
    )
