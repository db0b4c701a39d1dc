"""The ``--data`` forms: which one a spec names, and the names the rest of flexsurgeon uses.

``load_data(spec, data_config=...)`` turns a spec into a :class:`DataBundle` of train and val
datasets whose items are ``(normalised float tensor C x H x W, int label)``;
``make_loader`` wraps one in a deterministic ``DataLoader``. The forms, tried in this order:

- ``synthetic:[classes=10,train=2000,val=500,seed=0,size=H]``: generated, no download
  (``synthetic.py``); of the train transform options only ``hflip`` applies (default 0.5).
- ``PREFIX/NAME[:ROOT]`` with a timm prefix (``torch/``, ``hfds/``, ``hfids/``, ``tfds/``,
  ``wds/``): ``timm.data.create_dataset`` (``timm_sets.py``).
- a folder holding ``train-images*idx3-ubyte[.gz]`` and ``train-labels*idx1-ubyte[.gz]``
  (MNIST-style IDX files, ``idx.py``).
- an image folder: ``train/`` and ``val/`` (or ``validation/``) folders of class folders, or
  one folder of class folders split by a seeded stratified ``val_split`` (``image_folders.py``).

Images pass through timm's transforms (``create_transform`` with the model's data_config,
``transforms.py``). An image folder's scan leaves out the files whose header PIL cannot
open, and symlinked folders that would read images twice; an image that fails to decode later
is left out of its batch, never replaced. Both count in ``DataBundle.skipped``, across
DataLoader workers. Problems with the spec or layout raise a one-line ``DataError``.

May import: the base modules (``errors``, ``utils``) and torch/timm/PIL only.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .bundle import DataBundle, subset_train
from .idx import find_idx, load_idx
from .image_folders import IMAGE_EXTENSIONS, load_folder
from .loaders import make_loader
from .synthetic import SYNTHETIC_DEFAULTS, SYNTHETIC_MAX_CLASSES, load_synthetic, parse_synthetic
from .timm_sets import TIMM_PREFIXES, load_timm
from .transforms import Transforms

__all__ = ["DataBundle", "IMAGE_EXTENSIONS", "SYNTHETIC_DEFAULTS", "SYNTHETIC_MAX_CLASSES", "TIMM_PREFIXES",
           "load_data", "make_loader", "parse_synthetic", "subset_train"]

_FORMS = ("use an image folder (train/ + val/ class folders, or class folders), a folder of MNIST-style IDX "
          "files, synthetic: (no download) or a timm dataset such as torch/cifar10:ROOT")


def load_data(spec: str, *, data_config: dict, in_chans: int = 3, val_split: float = 0.1, seed: int = 0,
              train_transform_kwargs: dict | None = None, val_from_train: bool = False,
              train: bool = True) -> DataBundle:
    """Resolve a ``--data`` spec into train and val datasets (see the module docstring for forms).

    ``data_config`` is ``timm.data.resolve_data_config(model=model)``; its mean/std are
    repeated or trimmed to ``in_chans``. ``train_transform_kwargs`` go to timm's
    ``create_transform(is_training=True)`` (``synthetic:`` reads only ``hflip``). ``val_split`` and
    ``seed`` carve val out of train where the data has no val part of its own, and also where it
    has one when ``val_from_train`` (to choose settings without looking at a test split).
    ``train=False`` (scoring): a timm data set's train split is not loaded (the bundle's ``train``
    is None); the other forms read their train part, which val may be carved from.
    """
    spec = str(spec).strip()
    if not spec:
        raise DataError(f"--data is empty; {_FORMS}")
    if in_chans < 1:
        raise DataError(f"in_chans must be at least 1, got {in_chans}")
    generated = spec.startswith("synthetic:") or (spec == "synthetic" and not os.path.exists(spec))
    if val_from_train and (generated or (spec.lower().startswith(TIMM_PREFIXES) and not os.path.exists(spec))):
        raise DataError(f"val_from_train carves val out of an image folder's or IDX files' train part; --data {spec} "
                        "comes with its own splits")
    if generated:
        return load_synthetic(spec, data_config, in_chans, (train_transform_kwargs or {}).get("hflip", 0.5))
    transforms = Transforms(data_config, in_chans, train_transform_kwargs)
    if spec.lower().startswith(TIMM_PREFIXES) and not os.path.exists(spec):
        return load_timm(spec, transforms, train=train)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"--data {spec}: no such file or folder; {_FORMS}")
    if not root.is_dir():
        raise DataError(f"--data {spec} is a file, not a folder; pass the folder that holds the data")
    if find_idx(root, "train", "images", required=False) is not None:
        return load_idx(root, transforms, val_split, seed, val_from_train)
    return load_folder(root, transforms, val_split, seed, val_from_train)
