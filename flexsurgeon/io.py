"""Checkpoint folders: ``config.json`` + ``model.safetensors`` in timm's layout.

``config.json`` names the registered timm architecture ``flexsurgeon`` and carries the
surgery plan in ``model_args``, so ``timm.create_model('local-dir:DIR', pretrained=True)``
rebuilds the source model, re-applies the plan and loads the weights. Nothing here
unpickles: JSON and safetensors only. Folders are written to a temporary sibling and
renamed into place, so a crash never leaves a half-written checkpoint under DIR.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from .errors import CheckpointError, FlexSurgeonError, PlanError
from .plan import SurgeryPlan

ARCHITECTURE = "flexsurgeon"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PLAN_METADATA_KEY = "flexsurgeon_plan"
# what config.json may hold: ours, plus the fields timm's hub tools add
_CONFIG_KEYS = {"architecture", "num_classes", "num_features", "pretrained_cfg", "model_args", "global_pool",
                "label_names", "label_descriptions"}
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
    """Write a folder through ``write(tmp)`` into a temporary sibling, then swap it into place.

    A kill at any moment leaves DIR either as it was or complete and new: an existing DIR is
    exchanged with the new folder in one ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere it
    is renamed aside first, and the next save or load puts that copy back if the kill fell
    between the two renames. Leftovers of killed saves are removed by the next save.
    """
    from safetensors import SafetensorError

    directory = Path(directory)
    _recover(directory, clean=True)
    existed = directory.exists()
    if existed and not force:
        raise CheckpointError(f"output folder {directory} already exists; pass --force to replace it")
    if existed and not directory.is_dir():
        raise CheckpointError(f"output path {directory} exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if existed:
            _replace_dir(tmp, directory)  # tmp now holds the previous folder (or nothing)
        else:
            _rename(tmp, directory)
        _fsync_dir(directory.parent)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        kept = "; the previous checkpoint there is unchanged" if existed and directory.is_dir() else ""
        raise CheckpointError(f"could not write {directory}: {reason}{kept}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_rename = os.rename  # module-level so fault tests can stop a save between steps


def _replace_dir(new: Path, directory: Path) -> None:
    """Put ``new`` at ``directory`` (which exists); afterwards ``new`` holds the old folder or is gone."""
    if _exchange(new, directory):
        return
    old = directory.parent / f".{directory.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _rename(directory, old)
    try:
        _rename(new, directory)  # a kill just before this leaves only `old`: _recover puts it back
    except OSError:
        _rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    import ctypes

    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _fsync_tree(folder: Path) -> None:
    for name in os.listdir(folder):
        with open(folder / name, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the files themselves are synced
    finally:
        os.close(fd)


def _leftovers(directory: Path) -> list[tuple[Path, bool]]:
    """Temporary siblings of ``directory`` left by saves whose process is gone: (path, is_old_copy)."""
    found = []
    try:
        entries = list(directory.parent.iterdir())
    except OSError:
        return found
    for path in entries:
        for tag, is_old in ((_TMP_TAG, False), (_OLD_TAG, True)):
            prefix = f".{directory.name}{tag}"
            if path.name.startswith(prefix) and not _pid_alive(path.name[len(prefix):].partition("-")[0]):
                found.append((path, is_old))
    return found


def _pid_alive(text: str) -> bool:
    if not text.isdigit() or int(text) <= 0:
        return False  # older names carry no process id
    if int(text) == os.getpid():
        return True
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: leave its files alone
    return True


def recover(directory) -> None:
    """Put back the previous checkpoint at ``directory`` if a save was killed between its two renames."""
    _recover(Path(directory))


def _recover(directory: Path, clean: bool = False) -> None:
    """After a save was killed between its two renames, put the previous folder back at ``directory``.

    With ``clean`` (the next save), also delete what killed saves left: unfinished temporary
    folders and previous copies that were already replaced.
    """
    leftovers = _leftovers(directory)
    if not directory.exists():
        olds = sorted((p for p, is_old in leftovers if is_old and p.is_dir()), key=lambda p: p.stat().st_mtime)
        if olds:
            try:
                _rename(olds[-1], directory)
            except OSError as exc:
                raise CheckpointError(f"{directory} is missing because a save was interrupted; the previous "
                                      f"checkpoint is in {olds[-1]}: rename it to {directory.name} "
                                      f"({exc.strerror or exc})") from exc
            leftovers = [(p, is_old) for p, is_old in leftovers if p != olds[-1]]
    if clean:
        for path, _ in leftovers:
            shutil.rmtree(path, ignore_errors=True)


def save(model, directory, force: bool = False, extra_files=None) -> Path:
    """Write ``model`` (a converted model) as DIR/config.json + DIR/model.safetensors.

    ``extra_files`` maps file names to functions that write them into the temporary folder,
    so they land atomically with the model (the trainer's optimizer and RNG state).
    """
    from safetensors.torch import save_model

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
    _recover(directory)  # a save killed between its two renames: put the previous folder back
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
    if set(model_args) != {"plan"}:
        raise CheckpointError(f"{path} has unknown model_args field(s) "
                              f"{', '.join(sorted(set(model_args) - {'plan'}))}; only the plan belongs there")
    if not isinstance(config.get("pretrained_cfg", {}), dict):
        raise CheckpointError(f"{path}: pretrained_cfg must be a JSON object")
    return config


def _check_config_matches_plan(config: dict, plan: SurgeryPlan, directory: Path) -> None:
    num_classes = config.get("num_classes", plan.num_classes)
    if num_classes != plan.num_classes:
        raise CheckpointError(f"{directory / CONFIG_NAME} says num_classes {num_classes!r} but its plan has "
                              f"{plan.num_classes}; the file has been edited")


def read_weights_header(path: Path, plan: SurgeryPlan | None = None) -> dict[str, list[int]]:
    """The tensor shapes in a safetensors file, read from its header without loading any tensor.

    With ``plan``, the plan the file was written with (in its metadata) must equal it, so a
    config.json and a model.safetensors that do not belong together are refused before a
    model is built.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path}: {reason[:200]} (the file is empty, truncated or not "
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
    from .apply import apply_plan
    from .models import build_source

    if plan.source is None or plan.source.library == "custom":
        raise PlanError("the plan has no source model flexsurgeon can build")
    spec = dataclasses.replace(plan.source, kwargs={**plan.source.kwargs, **builder_kwargs})
    return apply_plan(build_source(spec, "random"), plan)


def load_weights(model, path: Path, shapes: dict[str, list[int]] | None = None) -> None:
    from collections import OrderedDict

    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
        state = OrderedDict(load_file(str(path)))
        # safetensors keeps no module versions; a model that checks its own (torchvision's MNASNet) gets them
        state._metadata = getattr(own, "_metadata", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path}: {reason[:200]}") from exc
    # tied tensors are saved once (safetensors' save_model): a key missing here that shares memory with a loaded
    # one was loaded through it
    loaded = {own[k].data_ptr() for k in state if k in own and own[k].numel()}
    missing = [k for k in missing if not (own[k].numel() and own[k].data_ptr() in loaded)]
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise CheckpointError(f"{path} does not match the model its plan builds: {detail}")


def load(directory, model=None):
    """Rebuild the converted model saved in ``directory`` and load its weights.

    ``model``: the unconverted source, built by the caller; needed for a folder converted
    from a custom model (any ``nn.Module``), optional otherwise. The plan is applied to that
    object itself and the weights are loaded strictly.
    """
    directory = Path(directory)
    config = read_config(directory)
    from .models import check_source

    try:  # the plan is validated, and its source looked up, before anything is built
        plan = SurgeryPlan.from_dict(config["model_args"]["plan"])
        if model is None:
            check_source(plan.source)
    except FlexSurgeonError as exc:
        raise type(exc)(f"{directory / CONFIG_NAME}: {exc}") from exc
    _check_config_matches_plan(config, plan, directory)
    shapes = read_weights_header(directory / WEIGHTS_NAME, plan)
    if model is None:
        model = build_from_plan(plan)
    else:
        from .apply import apply_plan

        apply_plan(model, plan)
    load_weights(model, directory / WEIGHTS_NAME, shapes)
    model.pretrained_cfg = model.default_cfg = _as_tuples(config.get("pretrained_cfg") or {})
    return model


def load_folder(directory, model_code: str | None = None):
    """``load``, with the source built from ``FILE.py:FACTORY`` when the command line names one."""
    model = None
    if model_code is not None:
        from .models import build_from_code

        plan = SurgeryPlan.from_dict(read_config(directory)["model_args"]["plan"])
        model = build_from_code(model_code, num_classes=plan.num_classes, in_chans=plan.in_chans)
    return load(directory, model=model)


def _as_tuples(cfg: dict) -> dict:
    """JSON gives lists; timm's own configs hold tuples (input_size, mean, std)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


# timm keyword arguments the plan fixes: given, they must agree with it
_PLAN_FIXED = {"num_classes": lambda plan: plan.num_classes, "in_chans": lambda plan: plan.in_chans}
# timm keyword arguments that cannot apply to a converted model
_REFUSED = {
    "features_only": "features_only is not supported for a converted model; call its forward_intermediates() "
                     "or forward_features() instead",
    "out_indices": "out_indices applies with features_only, which a converted model does not support; "
                   "use forward_intermediates(indices=...)",
    "global_pool": "global_pool cannot change on a converted model: its global pool is FlexPool",
    "img_size": "img_size is fixed by the conversion (FlexPool resamples its weights for other input sizes); "
                "convert again with --img-size to change it",
}
# what timm's create_model passes to every entrypoint, and what we set ourselves
_TIMM_PLUMBING = ("pretrained_cfg_overlay", "cache_dir", "pretrained_model_args", "pretrained_strict")


def _timm_entrypoint(pretrained: bool = False, plan=None, pretrained_cfg=None, **kwargs):
    """timm entrypoint for ``architecture: flexsurgeon`` (reached through ``local-dir:DIR``).

    Other keyword arguments go to the source model's builder (``drop_rate``,
    ``drop_path_rate``, ...), as ``timm.create_model`` would pass them to the source; those
    the plan fixes must agree with it, and those that cannot apply are refused.
    """
    if plan is None:
        raise PlanError("the flexsurgeon architecture needs the plan from a checkpoint's config.json "
                        "(timm.create_model('local-dir:DIR', pretrained=True))")
    plan = SurgeryPlan.from_dict(plan)
    extra = {k: v for k, v in kwargs.items() if v is not None and k not in _TIMM_PLUMBING}
    for key, message in _REFUSED.items():
        if extra.get(key) not in (None, False):
            raise PlanError(message)
        extra.pop(key, None)
    for key, fixed in _PLAN_FIXED.items():
        if key in extra and extra.pop(key) != fixed(plan):
            raise PlanError(f"this checkpoint has {key}={fixed(plan)}; convert again to change it")
    if plan.source is not None and plan.source.library == "custom":
        raise PlanError(f"this checkpoint was converted from a custom model ({plan.source.name}), which timm cannot "
                        "build: use flexsurgeon.load(DIR, model=YOUR_MODEL)")
    try:
        model = build_from_plan(plan, **extra)
    except TypeError as exc:
        raise PlanError(f"the source model {plan.source.label} does not take {', '.join(sorted(extra))}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from exc
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg or {})
    if pretrained:
        location = cfg.get("file")
        if not location:
            raise CheckpointError("pretrained=True needs a checkpoint folder: use 'local-dir:DIR'")
        load_weights(model, Path(location) / WEIGHTS_NAME, read_weights_header(Path(location) / WEIGHTS_NAME, plan))
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


__all__ = ["save", "load", "load_folder", "read_config", "build_from_plan", "register_timm_architecture"]
