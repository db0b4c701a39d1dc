"""Checkpoint folders: ``config.json`` + ``model.safetensors`` in timm's layout.

``config.json`` names the registered timm architecture ``flexsurgeon`` and carries the
surgery plan in ``model_args``, so ``timm.create_model('local-dir:DIR', pretrained=True)``
rebuilds the source model, re-applies the plan and loads the weights (``timm_registry.py``
registers it). Nothing here unpickles: JSON and safetensors only. Folders are written
through ``folders.write_folder``, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from pathlib import Path

import safetensors.torch  # called through the module: tests inject write faults into save_model
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, FlexSurgeonError, PlanError
from ..surgery.apply import apply_plan
from ..surgery.convert import make_pretrained_cfg
from ..surgery.model_code import build_from_code
from ..surgery.plan import ARCHITECTURE, SurgeryPlan
from ..surgery.sources import build_source, check_source
from ..utils import CONFIG_NAME, WEIGHTS_NAME, clip, first_line, is_hub_name
from .folders import check_not_interrupted, write_folder
from .hub import download_checkpoint

PLAN_METADATA_KEY = "flexsurgeon_plan"  # the plan again, as JSON in the safetensors metadata

# what config.json may hold: ours, plus the fields timm's hub tools add
_CONFIG_KEYS = {"architecture", "num_classes", "num_features", "pretrained_cfg", "model_args", "global_pool",
                "label_names", "label_descriptions"}
# model_args fields timm's export writes for information; they do not change what is built
_INFORMATIONAL_ARGS = ("global_pool", "img_size")
_MISSING = object()


def config_text(model) -> str:
    """The ``config.json`` that ``save`` would write for ``model``; a CheckpointError where
    ``model`` is not a converted model."""
    plan = getattr(model, "flexsurgeon_plan", None)
    if not isinstance(plan, SurgeryPlan):
        raise CheckpointError("only models returned by flexsurgeon.convert or flexsurgeon.load can be saved")
    config = {
        "architecture": ARCHITECTURE,
        "num_classes": plan.num_classes,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": make_pretrained_cfg(getattr(model, "pretrained_cfg", None), plan),
        "model_args": {"plan": plan.to_dict()},
    }
    return json.dumps(config, indent=2, sort_keys=True)


def check_can_save(model, output: Path) -> None:
    """Stop a run before it trains, not after an epoch, where its checkpoints could not be
    written: ``model`` must be a converted model, and its weights are written once to a
    scratch file in ``output`` and removed."""

    config_text(model)
    probe = output / f".save-check-{os.getpid()}.safetensors"
    try:
        output.mkdir(parents=True, exist_ok=True)
        try:
            safetensors.torch.save_model(model, str(probe))
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoints in {output}: {exc.strerror or first_line(exc)}; "
                              "nothing was trained") from None


def save(model, directory, force: bool = False, extra_files=None) -> Path:
    """Write ``model`` (a converted model) as DIR/config.json + DIR/model.safetensors.

    ``extra_files`` maps file names to functions that write them into the temporary folder,
    so they land atomically with the model (the trainer's optimizer and RNG state).
    """

    text = config_text(model)  # fails here, before anything is written
    plan = model.flexsurgeon_plan

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(text + "\n")
        metadata = {"format": "pt", PLAN_METADATA_KEY: plan.to_json()}
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_NAME), metadata=metadata)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)

    return write_folder(Path(directory), write, force)


def read_config(directory) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    check_not_interrupted(directory)
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
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{path} has unknown field(s) {', '.join(unknown)}; it was not written by flexsurgeon "
                              "or has been edited")
    model_args = config.get("model_args")
    if not isinstance(model_args, dict) or "plan" not in model_args:
        raise CheckpointError(f"{path} has no model_args.plan")
    if not isinstance(config.get("pretrained_cfg", {}), dict):
        raise CheckpointError(f"{path}: pretrained_cfg must be a JSON object")
    return config


def check_model_args(model_args: dict, plan: SurgeryPlan) -> None:
    """Besides the plan, a config's ``model_args`` may hold only what timm's own export
    records from a converted model: its class and channel counts (the plan's), its pool type
    and input size (for information), and the source's own builder arguments (the plan's
    values). Anything else would reach the model builder from a file, so it is refused."""
    source_kwargs = plan.source.kwargs if plan.source is not None else {}
    fixed = {"num_classes": plan.num_classes, "in_chans": plan.in_chans}
    wrong = sorted(k for k, v in model_args.items() if k != "plan" and k not in _INFORMATIONAL_ARGS
                   and fixed.get(k, source_kwargs.get(k, _MISSING)) != v)
    if wrong:
        raise CheckpointError(f"model_args field(s) {', '.join(wrong)} disagree with the plan or are not part of it; "
                              "the file has been edited or was not written from a converted model")


def read_folder(directory, buildable: bool = True) -> tuple[dict, SurgeryPlan]:
    """A checkpoint folder's config and plan, with the checks every way of reading a folder makes
    (``flexsurgeon.load``, ``local-dir:`` and ``hf-hub:`` through timm); each refusal names the file.
    ``buildable``: the plan's source must be a model flexsurgeon can build (not so when the caller
    brings the source model)."""
    directory = Path(directory)
    config = read_config(directory)
    try:
        plan = SurgeryPlan.from_dict(config["model_args"]["plan"])
        if buildable:  # looked up before anything is built
            check_source(plan.source)
    except FlexSurgeonError as exc:
        raise type(exc)(f"{directory / CONFIG_NAME}: {exc}") from exc
    _check_config_matches_plan(config, plan, directory)
    return config, plan


def _check_config_matches_plan(config: dict, plan: SurgeryPlan, directory: Path) -> None:
    num_classes = config.get("num_classes", plan.num_classes)
    if num_classes != plan.num_classes:
        raise CheckpointError(f"{directory / CONFIG_NAME} says num_classes {num_classes!r} but its plan has "
                              f"{plan.num_classes}; the file has been edited")
    try:
        check_model_args(config["model_args"], plan)
    except CheckpointError as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {exc}") from None


def read_weights_header(path: Path, plan: SurgeryPlan | None = None) -> dict[str, list[int]]:
    """The tensor shapes in a safetensors file, read from its header without loading any tensor.

    With ``plan``, the plan the file was written with (in its metadata) must equal it, so a
    config.json and a model.safetensors that do not belong together are refused before a
    model is built.
    """

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        reason = first_line(exc)
        raise CheckpointError(f"cannot load {path}: {clip(reason, 200)} (the file is empty, truncated or not "
                              "safetensors)") from exc
    written = metadata.get(PLAN_METADATA_KEY)
    if plan is not None and written is not None:
        try:
            written_plan = SurgeryPlan.from_json(written)
        except PlanError as exc:
            raise CheckpointError(f"{path} carries a damaged plan in its metadata: {exc}") from exc
        if written_plan != plan:
            fields = [k for k, v in plan.to_dict().items() if written_plan.to_dict().get(k) != v]
            raise CheckpointError(f"{path} was written for another plan than the one in {CONFIG_NAME} (they differ "
                                  f"in {', '.join(fields)}); the two files do not belong together")
    return shapes


def build_from_plan(plan: SurgeryPlan, **builder_kwargs):
    """A converted model with fresh weights: the source rebuilt at random init (with
    ``builder_kwargs`` on top of the plan's), the plan applied."""
    if plan.source is None or plan.source.library == "custom":
        raise PlanError("the plan has no source model flexsurgeon can build")
    spec = dataclasses.replace(plan.source, kwargs={**plan.source.kwargs, **builder_kwargs})
    return apply_plan(build_source(spec, "random"), plan)


def load_weights(model, path: Path, shapes: dict[str, list[int]] | None = None) -> None:
    if shapes is None:
        shapes = read_weights_header(path)
    own = model.state_dict()
    wrong = [(k, s, list(own[k].shape)) for k, s in shapes.items() if k in own and list(own[k].shape) != s]
    if wrong:
        name, theirs, ours = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"{path} does not match the model its plan builds: {name} has shape {theirs} in the "
                              f"file but {ours} in the model{more}")
    try:
        state = OrderedDict(safetensors.torch.load_file(str(path)))
        # safetensors keeps no module versions; a model that checks its own (torchvision's MNASNet) gets them
        state._metadata = getattr(own, "_metadata", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        reason = first_line(exc)
        raise CheckpointError(f"cannot load {path}: {clip(reason, 200)}") from exc
    # tied tensors are saved once (safetensors' save_model): a key missing here that shares memory with a loaded
    # one was loaded through it
    loaded = {own[k].data_ptr() for k in state if k in own and own[k].numel()}
    missing = [k for k in missing if not (own[k].numel() and own[k].data_ptr() in loaded)]
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(f"{path} does not match the model its plan builds: {detail}")


def load(directory, model=None):
    """Rebuild the converted model saved in ``directory`` (or in the Hub repository
    ``hf-hub:ORG/NAME[@REVISION]``) and load its weights.

    ``model``: the unconverted source, built by the caller; needed for a folder converted
    from a custom model (any ``nn.Module``), optional otherwise. The plan is applied to that
    object itself and the weights are loaded strictly.
    """
    hub_name = str(directory) if is_hub_name(directory) else None
    if hub_name:
        directory = download_checkpoint(hub_name)
    directory = Path(directory)
    try:
        config, plan = read_folder(directory, buildable=model is None)
        shapes = read_weights_header(directory / WEIGHTS_NAME, plan)
    except FlexSurgeonError as exc:
        if hub_name is None:
            raise
        # name the repository, not the cache path it was downloaded to
        raise type(exc)(str(exc).replace(str(directory), hub_name)) from None
    if model is None:
        model = build_from_plan(plan)
    else:
        apply_plan(model, plan)
    load_weights(model, directory / WEIGHTS_NAME, shapes)
    cfg = as_tuples(config.get("pretrained_cfg") or {})
    if hub_name:  # as timm records a model it loaded from the Hub
        cfg.update(hf_hub_id=hub_name.removeprefix("hf-hub:"), source="hf-hub")
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def load_folder(directory, model_code: str | None = None):
    """``load``, with the source built from ``FILE.py:FACTORY`` when the command line names one."""
    model = None
    if model_code is not None:
        folder = download_checkpoint(str(directory)) if is_hub_name(directory) else directory
        plan = SurgeryPlan.from_dict(read_config(folder)["model_args"]["plan"])
        model = build_from_code(model_code, num_classes=plan.num_classes, in_chans=plan.in_chans)
    return load(directory, model=model)


def as_tuples(cfg: dict) -> dict:
    """JSON gives lists; timm's own configs hold tuples (input_size, mean, std)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


__all__ = ["save", "load", "load_folder", "read_config", "read_folder", "build_from_plan", "load_weights",
           "read_weights_header"]

