"""The user's own model, named on the command line as ``FILE.py:FACTORY``: the one place where
flexsurgeon imports code, and only code the user named."""
from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

from torch import nn

from ..errors import ModelNotFoundError
from ..utils import clip, first_line

_MODEL_CODE = re.compile(r"^(?P<file>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


def is_model_code(text) -> bool:
    """True for ``FILE.py:FACTORY``, the command line's way to name a model in the user's own code."""
    return isinstance(text, str) and _MODEL_CODE.match(text) is not None


def build_from_code(text: str, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """Import ``FILE.py`` and call its ``FACTORY`` (with ``num_classes`` / ``in_chans`` where it
    takes them). Only for code the user named on the command line or in a call."""
    match = _MODEL_CODE.match(text)
    if match is None:
        raise ModelNotFoundError(f"'{text}' is not FILE.py:FACTORY")
    path, name = Path(match["file"]), match["name"]
    if not path.is_file():
        raise ModelNotFoundError(f"model code file not found: {path}")
    module_name = f"flexsurgeon_model_code.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so classes defined there pickle and unpickle (torch.save of a model)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        reason = clip(first_line(exc), 200)
        raise ModelNotFoundError(f"importing {path} failed: {type(exc).__name__}: {reason}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelNotFoundError(f"{path} has no function '{name}'")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    wanted = {"num_classes": num_classes, "in_chans": in_chans}
    kwargs = {k: v for k, v in wanted.items() if v is not None and (takes_any or k in params)}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelNotFoundError(f"{text} failed: {type(exc).__name__}: {clip(first_line(exc), 200)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelNotFoundError(f"{text} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


__all__ = ["build_from_code", "is_model_code"]
