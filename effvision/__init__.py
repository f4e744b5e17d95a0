"""effvision: efficient vision.

``import effvision`` is light: it imports neither torch nor timm, so the command line and the codec
path start fast. What it provides is loaded on first use (PEP 562 module ``__getattr__``):
:func:`reduce`, :func:`reduction_info`, :func:`create_reduced_model`, ``REGISTERED_MODELS`` and the
subpackages (``effvision.tokens``, ``effvision.peft``, ...).

The token-reduced timm names (``ppt_*``, ``tome_*``, ``topk_*``, ``sparse_tuning_*``, ``clca_*``) are
registered with timm by :func:`effvision.timm_models.register`, which imports timm. So that
``import effvision; import timm; timm.create_model("ppt_deit_small_patch16_224")`` keeps working:

* if timm is already imported, ``register()`` runs now;
* otherwise a one-shot import hook (:class:`_RegisterWhenTimmLoads`, first on ``sys.meta_path``) runs
  ``register()`` right after timm's own ``__init__`` has executed, then removes itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__version__ = "0.1.0"

__all__ = ["REGISTERED_MODELS", "create_reduced_model", "reduce", "reduction_info"]

# public name -> module that defines it, imported on first access
_LAZY_ATTRIBUTES = {
    "reduce": "effvision.tokens.reduce",
    "reduction_info": "effvision.tokens.reduce",
    "create_reduced_model": "effvision.tokens.registry",
}

# subpackages reachable as attributes after a plain ``import effvision`` (``effvision.tokens.forward_tokens``)
_LAZY_SUBMODULES = ("codecs", "export", "finetune", "image_io", "kernels", "peft", "timm_models", "tokens", "tune")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "REGISTERED_MODELS":  # every registered name: token reduction and PEFT
        from effvision.timm_models import register

        globals()[name] = value = tuple(register())
        return value
    if name not in _LAZY_ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_ATTRIBUTES, *_LAZY_SUBMODULES, "REGISTERED_MODELS"})


def _register_with_timm() -> None:
    # The registry modules import timm inside functions only, so running this from timm's own import
    # never meets one of them half-initialised.
    from effvision.timm_models import register

    register()


class _RegisterWhenTimmLoads:
    """``sys.meta_path`` finder that lets the normal finders locate the top-level ``timm`` module and
    wraps its loader so :func:`_register_with_timm` runs once ``timm/__init__.py`` has executed."""

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders; this one answers None meanwhile
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        _remove_hook(self)
        return spec


class _RegisteringLoader:
    """Delegates to timm's own loader, restores it on the module, then registers effvision's names."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register_with_timm()


def _remove_hook(hook: _RegisterWhenTimmLoads) -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(finder, _RegisterWhenTimmLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
