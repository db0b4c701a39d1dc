"""Build the unconverted source model: a timm name or a torchvision builder, and its weights.

Names: a timm model name (``resnet50``), or ``tv:NAME`` / ``torchvision:NAME`` for a
torchvision classification builder. Weights: ``"random"``, ``"pretrained"`` (the
library's own download), or a file (``.safetensors``; ``.pth``/``.pt``/``.bin`` are read
with ``torch.load(weights_only=True)``, so a file cannot run code).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import FlexSurgeonError, ModelNotFoundError, WeightsError
from ..utils import CONFIG_NAME, clip, first_line, is_hub_name
from .hub_models import hub_folder, hub_model_config, hub_spec, offline_hub_weights
from .model_code import build_from_code, is_model_code
from .plan import SourceSpec

# timm and torchvision are imported where a function needs them: importing timm registers our
# checkpoint architecture with it, whose module (checkpoints.timm_registry) imports this one.

_TV_PREFIXES = ("tv:", "torchvision:")
# timm's recorded arguments a SourceSpec keeps: these, and flat tuples or lists of them
_SOURCE_ARG_TYPES = (str, int, float, bool, type(None))
# Builders whose defaults add training-only auxiliary outputs; surgery works on the plain classifier.
_TV_DEFAULT_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def parse_source(name: str, num_classes: int | None = None, in_chans: int = 3) -> SourceSpec:
    """Turn a user's model name into a SourceSpec, or raise with the closest known names."""
    if is_hub_name(name):
        return hub_spec(name, num_classes, in_chans)
    for prefix in _TV_PREFIXES:
        if name.startswith(prefix):
            builder = name[len(prefix):]
            known = _torchvision_models()
            if builder not in known:
                raise ModelNotFoundError(f"unknown torchvision model '{builder}'{_did_you_mean(builder, known, 'tv:')}")
            if in_chans != 3:
                raise ModelNotFoundError("torchvision models take 3 input channels; --in-chans applies to timm models")
            kwargs = dict(_TV_DEFAULT_KWARGS.get(builder, {}))
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            return SourceSpec("torchvision", builder, kwargs)
    import timm

    if not timm.is_model(name):
        if Path(name).expanduser().exists():  # a path where a model name goes: say what it is
            raise ModelNotFoundError(_a_path_is_not_a_name(Path(name).expanduser(), name))
        raise ModelNotFoundError(f"unknown model '{name}'{_did_you_mean(name, timm.list_models(), '')} "
                                 "(torchvision models are named tv:NAME)")
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    return SourceSpec("timm", name, kwargs)


def _a_path_is_not_a_name(path: Path, name: str) -> str:
    if (path / CONFIG_NAME).is_file():
        return (f"{name} is a saved model folder, not a model name: a converted model is converted already "
                f"(fine-tune it: flexsurgeon finetune {name} --data ...); convert and inspect take a timm name, "
                "tv:NAME, hf-hub:ORG/NAME or FILE.py:FACTORY")
    kind = "folder" if path.is_dir() else "file"
    hint = "; for a state dict, give the model's name and --weights FILE" if path.is_file() else ""
    return (f"{name} is a {kind}, not a model name: give a timm name, tv:NAME, hf-hub:ORG/NAME or FILE.py:FACTORY"
            f"{hint}")


def pretrained_cfg_of(name: str) -> dict:
    """timm's pretrained config of a model name (``NAME[.TAG]`` or ``hf-hub:ORG/NAME``); {} for others."""
    if is_hub_name(name):
        return hub_model_config(name)[0]
    if name.startswith(_TV_PREFIXES) or is_model_code(name):
        return {}
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    return cfg.to_dict() if cfg is not None else {}


def _did_you_mean(name: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


_REGISTRY_ONLY = "plans name registered models only; module paths and callables are never imported"


def check_source(spec: SourceSpec) -> None:
    """Refuse a source that is not a builder in timm's registry or torchvision's model list.

    Names are looked up, never imported or evaluated, so a config.json cannot make
    flexsurgeon run code by naming a module path or a callable.
    """
    if spec.library == "timm":
        import timm

        if spec.name.split(".")[0] == "flexsurgeon":
            raise ModelNotFoundError("'flexsurgeon' is the architecture of converted checkpoints, not a source model")
        if not timm.is_model(spec.name):
            raise ModelNotFoundError(f"unknown timm model '{spec.name}' ({_REGISTRY_ONLY})")
    elif spec.library == "torchvision":
        if spec.name not in _torchvision_models():
            raise ModelNotFoundError(f"unknown torchvision model '{spec.name}' ({_REGISTRY_ONLY})")
    elif spec.library == "custom":
        raise ModelNotFoundError(f"this checkpoint was converted from a custom model ({spec.name}), which "
                                 "flexsurgeon does not build: pass it, flexsurgeon.load(DIR, model=YOUR_MODEL), "
                                 "or on the command line --model-code FILE.py:FACTORY")
    else:
        raise ModelNotFoundError(f"unknown model library '{spec.library}'")


def weights_origin(spec: SourceSpec | None, weights: str | Path, model: nn.Module) -> str:
    """Where ``model``'s weights came from, for ``SourceSpec.weights``: ``hf-hub:ID`` (timm's
    pretrained weights), ``torchvision:DEFAULT``, ``file:NAME`` or ``random``."""
    if weights == "random":
        return "random"
    if weights != "pretrained":
        return f"file:{Path(weights).name}"
    if spec is not None and is_hub_name(spec.weights):
        return spec.weights
    if spec is not None and spec.library == "torchvision":
        return "torchvision:DEFAULT"
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    if cfg.get("hf_hub_id"):
        return f"hf-hub:{cfg['hf_hub_id']}"
    return f"timm:{cfg['architecture']}.{cfg['tag']}" if cfg.get("architecture") and cfg.get("tag") else "pretrained"


def build_source(spec: SourceSpec, weights: str | Path = "random") -> nn.Module:
    """Instantiate ``spec`` with random, pretrained or file weights."""
    check_source(spec)
    if spec.library == "timm":
        import timm

        if weights == "pretrained":
            # a repository on the Hub (hf-hub:ORG/NAME) has its own weights, read from the Hub's cache as a
            # local-dir: folder; a name, timm's default tag's
            if is_hub_name(spec.weights):
                named, overlay = f"local-dir:{hub_folder(spec.weights)}", {}
            else:
                named, overlay = spec.name, offline_hub_weights(spec)
            try:
                return timm.create_model(named, pretrained=True, **overlay, **spec.kwargs)
            except Exception as exc:  # hub, URL and file errors all mean "no weights here"
                raise _download_error(spec, exc) from exc
        model = timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    elif spec.library == "torchvision":
        import torchvision

        if weights == "pretrained":
            kwargs = {k: v for k, v in spec.kwargs.items() if k != "num_classes"}
            try:
                model = torchvision.models.get_model(spec.name, weights="DEFAULT", **kwargs)
            except Exception as exc:
                raise _download_error(spec, exc) from exc
            num_classes = spec.kwargs.get("num_classes")
            if num_classes is not None:
                _reset_last_classifier(model, num_classes)
            return model
        model = torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
    if weights not in ("random", "pretrained"):
        load_weights_file(model, Path(weights))
    return model


def _download_error(spec: SourceSpec, exc: Exception) -> WeightsError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's load error heads its list ("Error(s) in loading state_dict for ResNet:"): keep the first entry
    reason = " ".join(lines[:2]) if lines and lines[0].endswith(":") else first_line(exc)
    if is_hub_name(spec.weights):  # the files are here (fetched or cached): they do not fit
        return WeightsError(f"the weights of {spec.weights} do not load into {spec.label} ({clip(reason, 200)})")
    return WeightsError(f"could not get pretrained weights for {spec.label} ({clip(reason, 160)}); without network "
                        "access pass --weights FILE (a local state dict) or --random-init")


def _reset_last_classifier(model: nn.Module, num_classes: int) -> None:
    """Give a torchvision model a fresh last layer with ``num_classes`` outputs."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = (name, module)
    if last is None:
        raise WeightsError("cannot find the classifier layer to resize for --num-classes")
    name, old = last
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict without running code: safetensors, or a weights-only torch file."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = first_line(exc)
        raise WeightsError(f"cannot read weights from {path}: {clip(reason, 200)} "
                           "(only safetensors and weights-only torch files are accepted)") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def classes_in_weights(model: nn.Module, path: Path) -> int | None:
    """The class count of the classifier in the weights at ``path`` where only its size differs
    from ``model``'s (a head trained for other classes), else None."""
    own, state = model.state_dict(), read_state_dict(path)
    resized = {k: v for k, v in state.items() if k in own and own[k].shape != v.shape}
    counts = {v.shape[0] for v in resized.values()}
    if len(counts) == 1 and all(v.shape[1:] == own[k].shape[1:] for k, v in resized.items()):
        return counts.pop()
    return None


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a source-model state dict; the classifier may differ in size (a new --num-classes)."""
    state = read_state_dict(path)
    own = model.state_dict()
    resized = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in resized}
    missing = [k for k in own if k not in state and k not in resized]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WeightsError(f"{path} does not fit {type(model).__name__}: {detail} "
                           f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    model.load_state_dict(state, strict=False)
    if resized:

        warnings.warn(f"{len(resized)} tensors of {path.name} differ in shape (a classifier for other classes); "
                      f"they are re-initialised: {', '.join(resized[:4])}", stacklevel=2)


def spec_at_size(spec: SourceSpec, img_size) -> SourceSpec:
    """A timm model whose input size is fixed when built (a ViT's patch grid and position
    embeddings) is built for a square ``img_size`` other than its own; timm resamples pretrained
    position embeddings to it. Other models run at any size and are left as they are."""
    if spec.library != "timm" or img_size is None or img_size[0] != img_size[1]:
        return spec
    import timm.models

    cfg = timm.models.get_pretrained_cfg(spec.name)
    native = tuple(getattr(cfg, "input_size", ())[1:]) if cfg is not None else ()
    if native == tuple(img_size):
        return spec
    try:
        with torch.device("meta"):  # the class and its attributes, without the cost of initialising weights
            probe = build_source(spec, "random")
    except Exception:  # a model whose init cannot run on the meta device
        probe = build_source(spec, "random")
    fixed = "img_size" in inspect.signature(type(probe).__init__).parameters and not getattr(
        probe, "dynamic_img_size", False)
    return dataclasses.replace(spec, kwargs={**spec.kwargs, "img_size": img_size[0]}) if fixed else spec


def resolve_source(name_or_model, *, num_classes: int | None = None, in_chans: int = 3,
                   weights: str | Path = "random", img_size=None) -> tuple[nn.Module, SourceSpec]:
    """The source model and how to rebuild it, from a model name (timm, ``tv:NAME``), the user's
    ``FILE.py:FACTORY`` or an ``nn.Module`` the caller built, with ``weights`` (``"random"``,
    ``"pretrained"`` or a file; the file's trained head keeps its class count unless
    ``num_classes`` says otherwise). The spec's ``weights`` says where the weights came from
    ("" for an instance the caller built); code and instances get a ``custom`` spec unless timm
    recorded how it built them."""
    origin = ""  # an instance the caller built: where its weights came from is not known here
    if is_model_code(name_or_model):  # the user's own code, named by the user
        name_or_model = build_from_code(name_or_model, num_classes=num_classes, in_chans=in_chans)
        if weights not in ("random", "pretrained"):
            load_weights_file(name_or_model, Path(weights))
        origin = weights_origin(None, weights, name_or_model)
    elif isinstance(name_or_model, str):
        if num_classes is None and weights not in ("random", "pretrained"):  # a trained head keeps its classes
            num_classes = classes_in_weights(build_source(parse_source(name_or_model, in_chans=in_chans)),
                                             Path(weights))
        spec = spec_at_size(parse_source(name_or_model, num_classes=num_classes, in_chans=in_chans), img_size)
        model = build_source(spec, weights)
        return model, dataclasses.replace(spec, weights=weights_origin(spec, weights, model))
    if not isinstance(name_or_model, nn.Module):
        raise FlexSurgeonError(f"expected a model name or an nn.Module, got {type(name_or_model).__name__}")
    model = name_or_model
    if getattr(model, "flexsurgeon_plan", None) is not None:
        raise FlexSurgeonError("this model has been converted already")
    if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
        if not hasattr(model, "reset_classifier"):
            raise FlexSurgeonError("this model has no reset_classifier(); build it with the classes you want")
        model.reset_classifier(num_classes)
    spec = _timm_spec_of(model) or SourceSpec("custom", type(model).__name__, {})
    return model, dataclasses.replace(spec, weights=origin)


def _timm_spec_of(model: nn.Module) -> SourceSpec | None:
    """How to rebuild a timm-created instance, from the arguments timm recorded on it."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    args = getattr(model, "_model_args", None)
    if not name or not isinstance(args, dict):
        return None
    def plain(v) -> bool:
        return isinstance(v, _SOURCE_ARG_TYPES) or (
            isinstance(v, (tuple, list)) and all(isinstance(x, _SOURCE_ARG_TYPES) for x in v))

    if not all(plain(v) for v in args.values()):
        # e.g. act_layer=nn.SiLU: a plan holds JSON, and timm rebuilt without the argument would be
        # another network, so the model is saved as the user's own, rebuilt by the user
        return None
    kwargs = {k: tuple(v) if isinstance(v, (tuple, list)) else v for k, v in args.items()}
    kwargs["num_classes"] = getattr(model, "num_classes", kwargs.get("num_classes"))
    return SourceSpec("timm", name, kwargs)
