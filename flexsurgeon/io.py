"""Checkpoint folders: ``config.json`` + ``model.safetensors`` in timm's layout.

``config.json`` names the registered timm architecture ``flexsurgeon`` and carries the
surgery plan in ``model_args``, so ``timm.create_model('local-dir:DIR', pretrained=True)``
rebuilds the source model, re-applies the plan and loads the weights. Nothing here
unpickles: JSON and safetensors only. Folders are written to a temporary sibling and
renamed into place, so a crash never leaves a half-written checkpoint under DIR.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import CheckpointError, PlanError
from .plan import SurgeryPlan

ARCHITECTURE = "flexsurgeon"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PLAN_METADATA_KEY = "flexsurgeon_plan"
# pretrained_cfg fields that point at the source's download location; a converted model has none
_SOURCE_LOCATION_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag",
                         "custom_load", "hf_hub_revision")


def _json_safe(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def make_pretrained_cfg(source_cfg: dict | None, plan: SurgeryPlan) -> dict:
    """The data config a converted model carries: the source's, at the plan's input size."""
    cfg = {k: v for k, v in dict(source_cfg or {}).items() if k not in _SOURCE_LOCATION_KEYS and _json_safe(v)}
    cfg.setdefault("mean", (0.485, 0.456, 0.406))
    cfg.setdefault("std", (0.229, 0.224, 0.225))
    cfg.setdefault("interpolation", "bilinear")
    cfg.setdefault("crop_pct", 0.875)
    cfg["input_size"] = (plan.in_chans, *plan.img_size)
    cfg["pool_size"] = plan.pools[0].size
    cfg.pop("test_input_size", None)  # FlexPool would resample there; the native size is the tested one
    cfg["num_classes"] = plan.num_classes
    cfg["architecture"] = ARCHITECTURE
    return cfg


def _write_atomic_dir(directory: Path, write, force: bool) -> Path:
    directory = Path(directory)
    if directory.exists() and not force:
        raise CheckpointError(f"output folder {directory} already exists; pass --force to replace it")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"output path {directory} exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except OSError as exc:
        raise CheckpointError(f"could not write {directory}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def save(model, directory, force: bool = False, extra_files=None) -> Path:
    """Write ``model`` (a converted model) as DIR/config.json + DIR/model.safetensors.

    ``extra_files`` maps file names to functions that write them into the temporary folder,
    so they land atomically with the model (the trainer's optimizer and RNG state).
    """
    from safetensors.torch import save_model

    plan = getattr(model, "flexsurgeon_plan", None)
    if not isinstance(plan, SurgeryPlan):
        raise CheckpointError("only models returned by flexsurgeon.convert or flexsurgeon.load can be saved")
    if plan.source is None:
        raise CheckpointError("this model was converted from an instance flexsurgeon cannot rebuild; "
                              "convert it by name (a timm name or tv:NAME) to save it")
    config = {
        "architecture": ARCHITECTURE,
        "num_classes": plan.num_classes,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": make_pretrained_cfg(getattr(model, "pretrained_cfg", None), plan),
        "model_args": {"plan": plan.to_dict()},
    }
    text = json.dumps(config, indent=2, sort_keys=True)  # fails here, before anything is written

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(text + "\n")
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", PLAN_METADATA_KEY: plan.to_json()})
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    return _write_atomic_dir(Path(directory), write, force)


def read_config(directory) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}; it is not a flexsurgeon checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if config.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{path} names architecture {config.get('architecture')!r}, not {ARCHITECTURE!r}; "
                              "it was not written by flexsurgeon")
    model_args = config.get("model_args")
    if not isinstance(model_args, dict) or "plan" not in model_args:
        raise CheckpointError(f"{path} has no model_args.plan")
    return config


def build_from_plan(plan: SurgeryPlan):
    """A converted model with fresh weights: the source rebuilt at random init, the plan applied."""
    from .apply import apply_plan
    from .models import build_source

    if plan.source is None:
        raise PlanError("the plan has no source model to rebuild")
    return apply_plan(build_source(plan.source, "random"), plan)


def load_weights(model, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path}: {reason[:200]}") from exc
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(f"{path} does not match the model its plan builds: {detail}")


def load(directory):
    """Rebuild the converted model saved in ``directory`` and load its weights."""
    directory = Path(directory)
    config = read_config(directory)
    plan = SurgeryPlan.from_dict(config["model_args"]["plan"])
    model = build_from_plan(plan)
    load_weights(model, directory / WEIGHTS_NAME)
    model.pretrained_cfg = model.default_cfg = _as_tuples(config.get("pretrained_cfg") or {})
    return model


def _as_tuples(cfg: dict) -> dict:
    """JSON gives lists; timm's own configs hold tuples (input_size, mean, std)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _timm_entrypoint(pretrained: bool = False, plan=None, pretrained_cfg=None, **kwargs):
    """timm entrypoint for ``architecture: flexsurgeon`` (reached through ``local-dir:DIR``)."""
    if plan is None:
        raise PlanError("the flexsurgeon architecture needs the plan from a checkpoint's config.json "
                        "(timm.create_model('local-dir:DIR', pretrained=True))")
    plan = SurgeryPlan.from_dict(plan)
    extra = {k: v for k, v in kwargs.items()
             if v is not None and k not in ("pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")}
    if extra.get("num_classes", plan.num_classes) != plan.num_classes:
        raise PlanError(f"this checkpoint has {plan.num_classes} classes; reconvert to change num_classes")
    model = build_from_plan(plan)
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg or {})
    if pretrained:
        location = cfg.get("file")
        if not location:
            raise CheckpointError("pretrained=True needs a checkpoint folder: use 'local-dir:DIR'")
        load_weights(model, Path(location) / WEIGHTS_NAME)
    model.pretrained_cfg = model.default_cfg = _as_tuples(cfg)
    return model


def register_timm_architecture() -> None:
    """Register ``flexsurgeon`` in timm's model registry (idempotent)."""
    import sys

    from timm.models import is_model, register_model

    if is_model(ARCHITECTURE):
        return
    module = sys.modules[__name__]
    entry = _timm_entrypoint
    entry.__name__ = ARCHITECTURE
    entry.__module__ = module.__name__
    register_model(entry)


__all__ = ["save", "load", "read_config", "build_from_plan", "register_timm_architecture"]
