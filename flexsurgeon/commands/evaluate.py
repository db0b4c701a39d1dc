"""``flexsurgeon eval``: accuracy and loss of the main classifier and of every SAC head.

``evaluate_source`` scores a folder written by convert or finetune (a run folder means its
``best/`` checkpoint, else ``last/``) or, for comparison, a plain timm / torchvision model
name, on the validation split of any ``--data`` form that finetune takes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from timm.data import resolve_data_config
from tqdm import tqdm

from ..checkpoints.folders import check_not_interrupted
from ..checkpoints.io import load_folder
from ..data import load_data
from ..data.loaders import make_loader
from ..errors import CheckpointError, DataError
from ..runs.layout import checkpoint_source, is_checkpoint_source
from ..surgery.model_code import is_model_code
from ..surgery.sources import resolve_source
from ..training.metrics import evaluate
from ..training.recipe import Recipe
from ..training.setup import device_settings, resolve_device
from ..utils import is_hub_name, training_mode


def load_model(source: str, *, weights: str | Path = "pretrained", num_classes: int | None = None,
               img_size=None, in_chans: int = 3, model_code: str | None = None):
    """``(model, label, data_config)`` for a checkpoint folder, an ``hf-hub:`` checkpoint or a model
    name (``FILE.py:FACTORY`` included); ``model_code`` builds the source of a folder converted from a custom model.
    The options for a model name (classes, input size, channels, weights) are refused for a checkpoint."""
    if is_checkpoint_source(source):  # a folder, or a checkpoint on the Hub (or in its local cache)
        given = [option for option, used in (("--num-classes", num_classes is not None),
                                             ("--img-size", img_size is not None), ("--in-chans", in_chans != 3),
                                             ("--weights/--random-init", weights != "pretrained")) if used]
        if given:
            raise CheckpointError(f"{given[0]} applies to a model given by name; {source} is a checkpoint, with "
                                  "its own classes, input size, channels and weights")
        checkpoint = checkpoint_source(source)
        model = load_folder(checkpoint, model_code)
        return model, str(checkpoint), resolve_data_config(model=model)
    if "/" in source and not source.startswith(("tv:", "torchvision:")) and not is_model_code(source) \
            and not is_hub_name(source):
        check_not_interrupted(Path(source))
        raise CheckpointError(f"no such checkpoint folder: {source}")
    if model_code is not None:
        raise CheckpointError(f"--model-code builds the source of a converted folder; {source} is not one "
                              "(to score your own model, give FILE.py:FACTORY as MODEL)")
    model, spec = resolve_source(source, num_classes=num_classes, in_chans=in_chans, weights=weights)
    args = {"input_size": (in_chans, *img_size)} if img_size else {}
    label = source if is_model_code(source) else spec.label
    return model, label, resolve_data_config(args=args, model=model)


def evaluate_source(source: str, data_spec: str, *, batch_size: int = 64, workers: int = 2, device: str = "auto",
                    val_split: float | None = None, seed: int | None = None, weights: str | Path = "pretrained",
                    num_classes: int | None = None, img_size=None, in_chans: int = 3,
                    model_code: str | None = None, progress: bool = True) -> dict:
    """Score ``source`` on the val split of ``data_spec``.

    Returns ``{"model", "data", "count", "heads": {name: {"top1", "top5", "loss"}}}`` with
    accuracies in percent; heads are the SAC heads (``sac:NODE``), then ``main``. ``val_split``
    (default 0.1) and ``seed`` (default 0) carve val out of data without a val part of its own,
    and are refused for data with one.
    """
    model, label, data_config = load_model(source, weights=weights, num_classes=num_classes, img_size=img_size,
                                           in_chans=in_chans, model_code=model_code)
    chans = model.flexsurgeon_plan.in_chans if hasattr(model, "flexsurgeon_plan") else in_chans
    given = "--val-split" if val_split is not None else "--seed" if seed is not None else None
    val_split, seed = 0.1 if val_split is None else val_split, 0 if seed is None else seed
    data = load_data(data_spec, data_config=data_config, in_chans=chans, val_split=val_split, seed=seed,
                     train=False)
    if given and not data.val_carved:
        raise DataError(f"{given} applies to data without a val part of its own; {data_spec} has one")
    outputs = _num_outputs(model, data_config["input_size"])
    if outputs != data.num_classes:  # a score against other classes would look like a result and mean nothing
        raise DataError(f"{label} has {outputs} classes but the data has {data.num_classes}; evaluate a model "
                        f"fine-tuned on these classes (flexsurgeon finetune ... --data {data_spec})")
    torch_device = resolve_device(device)
    settings = device_settings(torch_device, Recipe())  # what finetune's default recipe would use here
    model.to(torch_device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_loader(data.val, batch_size=batch_size, train=False, seed=seed, num_workers=workers,
                         pin_memory=settings.pin_memory)
    bar = tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True)
    summary = evaluate(model, bar, torch_device, autocast=settings.autocast, channels_last=settings.channels_last)
    heads = {h: {"top1": summary["top1"][h], "top5": summary["top5"][h], "loss": summary["loss"][h]}
             for h in summary["top1"]}
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return {"model": label, "data": data.description, "count": summary["count"], "heads": heads,
            "label_names": list(names) if names else None, "one_class": summary.get("one_class")}


def _num_outputs(model, input_size) -> int:
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    with training_mode(model, False), torch.no_grad():
        out = model(torch.zeros(1, *input_size))
    return out.shape[-1]
