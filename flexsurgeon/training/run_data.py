"""The data a fine-tuning run trains on: the data config its model implies (a loaded checkpoint's,
or a model name's before the model exists) and the recipe's augmentation, split and subset."""
from __future__ import annotations

from timm.data import resolve_data_config
from torch import nn

from ..data import load_data
from ..data.bundle import subset_train
from ..surgery.sources import pretrained_cfg_of
from ..utils import as_size
from .recipe import Recipe


def data_config_for_name(name: str, img_size, in_chans: int) -> dict:
    """The data config a model name implies, before the model exists (its classes come from the data)."""
    cfg = pretrained_cfg_of(name)
    size = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        size = (in_chans, *as_size(img_size))
    return resolve_data_config(args={"input_size": (in_chans, *size[1:])}, pretrained_cfg=cfg)


def train_transform_kwargs(recipe: Recipe) -> dict:
    """The recipe's options for timm's ``create_transform(is_training=True)``."""
    return {"hflip": recipe.hflip, **({"scale": tuple(recipe.scale)} if recipe.scale else {})}


def load_run_data(data_spec: str, data_config: dict, in_chans: int, recipe: Recipe):
    """``data_spec`` loaded for training as ``recipe`` says (augmentation, val split, subset)."""

    data = load_data(data_spec, data_config=data_config, in_chans=in_chans, val_split=recipe.val_split,
                     seed=recipe.seed, train_transform_kwargs=train_transform_kwargs(recipe),
                     val_from_train=recipe.val_from_train)
    return subset_train(data, recipe.train_subset, recipe.seed) if recipe.train_subset else data


def checkpoint_data(data_spec: str, model: nn.Module, recipe: Recipe):
    """The data for a loaded checkpoint: its data config, its input channels."""

    return load_run_data(data_spec, resolve_data_config(model=model), model.flexsurgeon_plan.in_chans, recipe)


def name_classes(model: nn.Module, data) -> None:
    """The data's class names into ``pretrained_cfg['label_names']``, timm's place for them, so
    that they travel with every checkpoint of the run."""
    if len(data.class_names) == data.num_classes:
        model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", None) or {}),
                                "label_names": list(data.class_names)}
