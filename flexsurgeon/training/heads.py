"""The classifier and the added modules during fine-tuning: what a freeze schedule trains first, the linear FlexPool
penalty, and a new classifier (and SAC heads) for the data's classes.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TrainingError
from ..layers.pools import FlexPool
from ..surgery.apply import new_parameter_names


def head_parameter_names(model: nn.Module) -> list[str]:
    """The new parameters and the classifier's: what a freeze schedule trains first.

    The classifier is timm's ``get_classifier()`` where the model has it, else the module
    ``pretrained_cfg['classifier']`` names, else the last Linear / Conv2d with
    ``num_classes`` outputs (torchvision).
    """
    ids = {id(p): n for n, p in model.named_parameters()}
    classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if isinstance(classifier, nn.Module) and any(id(p) in ids for p in classifier.parameters()):
        own = [ids[id(p)] for p in classifier.parameters() if id(p) in ids]
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        names = cfg.get("classifier") if isinstance(cfg, dict) else None
        names = [n for n in ([names] if isinstance(names, str) else list(names or [])) if _has_module(model, n)]
        if not names:
            outputs = model.flexsurgeon_plan.num_classes
            layers = [n for n, m in model.named_modules() if not n.startswith("sac_heads")
                      and isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] == outputs]
            names = layers[-1:]
        own = [f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters()]
    return new_parameter_names(model) + own


def regularizer(model: nn.Module) -> torch.Tensor:
    """The linear FlexPool penalty summed over all pools and heads (zero for softmax)."""
    terms = [m.regularizer() for m in model.modules() if isinstance(m, FlexPool)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def reset_head(model: nn.Module, num_classes: int, data_classes: int, log) -> None:
    """A new classifier (and SAC heads) for ``num_classes``, as timm's ``reset_classifier`` makes it."""
    classes = model.flexsurgeon_plan.num_classes
    if num_classes != data_classes:
        raise TrainingError(f"--num-classes {num_classes} but the data has {data_classes} classes")
    if num_classes == classes:
        return
    if not callable(getattr(model, "reset_classifier", None)):
        raise TrainingError(f"{type(model).__name__} has no reset_classifier to give it {num_classes} classes; "
                            f"convert its source again with --num-classes {num_classes}")
    model.reset_classifier(num_classes)
    log(f"re-initialised the classifier and the SAC heads for {num_classes} classes (the checkpoint had {classes})")
