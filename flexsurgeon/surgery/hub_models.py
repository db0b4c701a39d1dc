"""timm models on the Hugging Face Hub: an ``hf-hub:ORG/NAME`` repository as a source to convert
(its config.json's architecture and arguments, its own weights, read from the Hub's cache as
a ``local-dir:`` folder), and the cached weights of a timm name where the Hub cannot be
reached.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import HubError, ModelNotFoundError, WeightsError
from ..hub import download_file, hub_host, hub_reachable
from ..utils import CONFIG_NAME, WEIGHTS_NAME
from .plan import ARCHITECTURE, SourceSpec


def hub_spec(name: str, num_classes: int | None, in_chans: int) -> SourceSpec:
    """A timm model on the Hub (``hf-hub:ORG/NAME``, as ``timm.create_model`` takes it): the
    architecture and arguments its config.json records; its weights are the repository's."""
    arch, model_args = hub_model_config(name)[1:]
    if arch == ARCHITECTURE:
        raise ModelNotFoundError(f"{name} holds a converted model already: finetune, eval and export take it as it is")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()
              if k not in ("num_classes", "in_chans")}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif isinstance(model_args.get("num_classes"), int):
        kwargs["num_classes"] = model_args["num_classes"]
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    return SourceSpec("timm", arch, kwargs, weights=name)


def hub_model_config(name: str) -> tuple[dict, str, dict]:
    """``(pretrained_cfg, architecture, model_args)`` of the timm model in the Hub repository
    ``name``, as its config.json records them (the layout timm's ``push_to_hf_hub`` writes;
    older files are one flat ``pretrained_cfg`` that names the architecture)."""
    path = download_file(name, CONFIG_NAME)
    try:
        config = json.loads(path.read_text())
        arch = config["architecture"]
    except (ValueError, KeyError, TypeError):
        raise ModelNotFoundError(f"{name} is no timm model: its config.json names no architecture") from None
    pretrained_cfg = dict(config.get("pretrained_cfg") or config)
    pretrained_cfg.pop("architecture", None)
    if isinstance(config.get("num_classes"), int):
        pretrained_cfg["num_classes"] = config["num_classes"]
    model_args = config.get("model_args")
    return pretrained_cfg, arch, dict(model_args) if isinstance(model_args, dict) else {}


def hub_folder(name: str) -> Path:
    """The cached copy of the Hub repository ``name``: its config.json and weights, which timm
    reads as a ``local-dir:`` folder (``model.safetensors``, else ``pytorch_model.bin`` with
    ``weights_only=True``)."""
    config = download_file(name, CONFIG_NAME)
    missing = ""
    for filename in (WEIGHTS_NAME, "pytorch_model.bin"):
        try:
            weights = download_file(name, filename)
        except HubError as exc:
            missing = str(exc)
            continue
        if weights.parent == config.parent:  # one snapshot of the repository
            return config.parent
        missing = f"{filename} and {CONFIG_NAME} came from different revisions"
    raise WeightsError(f"could not get pretrained weights for {name}: {missing}")


def offline_hub_weights(spec: SourceSpec) -> dict:
    """Where the Hugging Face Hub cannot be reached, the cached weights file as timm's
    ``pretrained_cfg_overlay`` (or a WeightsError at once): the hub client would retry for
    most of a minute before falling back to its cache or failing."""
    from timm.models import get_pretrained_cfg  # timm where used: see sources.py

    cfg = get_pretrained_cfg(spec.name)
    if cfg is None or not cfg.hf_hub_id or hub_reachable():
        return {}
    for filename in filter(None, (cfg.hf_hub_filename, WEIGHTS_NAME, "pytorch_model.bin")):
        try:
            cached = download_file(cfg.hf_hub_id, filename)  # from the cache: the Hub is out of reach
        except HubError:
            continue
        return {"pretrained_cfg_overlay": {"file": str(cached), "hf_hub_id": None, "url": None}}
    raise WeightsError(f"could not get pretrained weights for {spec.label}: no network ({hub_host()} cannot be "
                       f"reached) and they are not in the local cache; pass --weights FILE (a local state dict) "
                       "or --random-init")
