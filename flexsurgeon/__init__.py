"""flexsurgeon: replace a model's global pooling (CNNs, vision transformers) with FlexPool and attach SAC heads.

Public API: ``convert``, ``inspect``, ``save``, ``load``, ``forward_with_sac``,
``strip_sac_heads``, ``FlexPool``, ``SACHead``, ``SurgeryPlan``, ``FlexSurgeonError``.
Heavy modules (torch, timm) load on first use, so ``flexsurgeon --help`` stays instant;
the timm architecture ``flexsurgeon`` (used by ``timm.create_model('local-dir:DIR')``) is
registered as soon as timm is imported.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from .errors import FlexSurgeonError
from .version import __version__

_LAZY = {
    "convert": ".surgery.convert",
    "inspect": ".surgery.convert",
    "save": ".checkpoints.io",
    "load": ".checkpoints.io",
    "FlexPool": ".layers.pools",
    "SACHead": ".layers.sac_head",
    "flex_pool2d": ".layers.pools",
    "SurgeryPlan": ".surgery.plan",
    "forward_with_sac": ".surgery.sac",
    "strip_sac_heads": ".surgery.sac",
}
__all__ = [*_LAZY, "FlexSurgeonError", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flexsurgeon' has no attribute {name!r}")


def _register() -> None:
    from .checkpoints.timm_registry import register_timm_architecture

    register_timm_architecture()


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Registers our timm architecture right after timm is imported, without importing it ourselves."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimmImport())
