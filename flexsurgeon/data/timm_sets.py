"""The timm data form: ``PREFIX/NAME[:ROOT]`` handed to ``timm.data.create_dataset``.

Prefixes ``torch/``, ``hfds/``, ``hfids/``, ``tfds/``, ``wds/``; splits 'train' and 'validation'
(then 'test'), ``download=True``; ROOT defaults to ``~/.cache/flexsurgeon/datasets/NAME``.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

from timm.data import create_dataset

from ..errors import DataError
from ..utils import first_line
from .bundle import DataBundle, sizes
from .transforms import Transforms

TIMM_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")


def load_timm(spec, transforms: Transforms, *, train: bool = True) -> DataBundle:
    """``train=False`` loads the val split alone (its class names too): scoring a model needs no
    train split, which for a large data set is a large download."""
    name, _, root = spec.partition(":")
    root = root or str(Path("~/.cache/flexsurgeon/datasets").expanduser() / re.sub(r"[^\w.-]+", "_", name))
    hint = "no network? use synthetic: or a local image / IDX folder"

    def create(split, transform):
        printed = io.StringIO()  # what a backend prints (download notes, install advice): kept for success only
        try:
            with contextlib.redirect_stdout(printed):
                dataset = create_dataset(name, root=root, split=split, download=True, is_training=split == "train",
                                         input_img_mode=transforms.mode, transform=transform)
        except DataError:
            raise
        except ModuleNotFoundError as e:  # the backend's package (datasets, tensorflow_datasets, webdataset)
            raise DataError(f"--data {spec}: timm needs the Python package {e.name!r} for {name.split('/')[0]}/ "
                            f"data sets: pip install {e.name}") from None
        except Exception as e:  # anything else the backend raises: network, unknown name
            raise DataError(f"--data {spec}: timm could not load split {split!r} ({type(e).__name__}: "
                            f"{first_line(e, '')}); {hint}") from None
        sys.stdout.write(printed.getvalue())
        return dataset

    train_set = create("train", transforms(train=True)) if train else None
    try:
        val = create("validation", transforms(train=False))
    except DataError:
        val = create("test", transforms(train=False))
    names = _timm_class_names(val if train_set is None else train_set)
    if names is None:
        raise DataError(f"--data {spec}: cannot tell the number of classes of this data set; {hint}")
    return DataBundle(train_set, val, len(names), names,
                      f"timm dataset {name} at {root}: {sizes(train_set, val, len(names))}")


def _timm_class_names(dataset) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes]
    reader = getattr(dataset, "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    if mapping:
        return [str(k) for k, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    count = getattr(reader, "num_classes", None) or getattr(dataset, "num_classes", None)
    return [str(c) for c in range(int(count))] if count else None
