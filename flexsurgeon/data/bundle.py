"""DataBundle, what every data form returns, and what the forms share in building one.

That is: the seeded stratified val split, the seeded training subset, the summary of sizes
in a bundle's description, and the first line of an error a backend raised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from ..errors import DataError
from .seeds import generator


@dataclass
class DataBundle:
    """Train and val datasets of ``(float tensor C x H x W, int label)`` plus what logs need."""

    train: Dataset | None  # None where only val was asked for (scoring a timm data set)
    val: Dataset
    num_classes: int
    class_names: list[str]
    description: str
    left_out: int = 0  # unreadable images the scan left out (not in train or val)
    val_carved: bool = False  # val was carved out of train by val_split (the data has no val part, or val_from_train)

    @property
    def skipped(self) -> int:
        """Unreadable images left out: at scan time, and those that failed to decode so far in
        this process and its DataLoader workers."""
        return self.left_out + skipped(self.train) + skipped(self.val)


def skipped(dataset) -> int:
    dataset = getattr(dataset, "dataset", dataset)  # through a Subset
    return int(getattr(dataset, "skipped", 0))


def subset_train(data: DataBundle, size: int, seed: int) -> DataBundle:
    """``data`` with a seeded random subset of ``size`` training images (for quick ablations)."""
    if isinstance(data.train, IterableDataset):
        raise DataError("a training subset needs a data set with a length; this one streams")
    if not 1 <= size <= len(data.train):
        raise DataError(f"a training subset of {size} images is impossible: the training set has {len(data.train)}")
    if size == len(data.train):
        return data
    picked = torch.randperm(len(data.train), generator=generator(seed, 0x5B5E7)).tolist()
    subset = Subset(data.train, sorted(picked[:size]))
    return DataBundle(subset, data.val, data.num_classes, data.class_names,
                      f"{data.description}; training on a seeded subset of {size}", data.left_out, data.val_carved)


def stratified_split(labels, val_split, seed, where) -> tuple[list[int], list[int]]:
    """Per class, a seeded shuffle puts ``round(n * val_split)`` images (at least 1 when n >= 2) in val."""
    if not 0.0 < float(val_split) < 1.0:
        raise DataError(f"{where} has no val part of its own; --val-split must be between 0 and 1, got {val_split}")
    labels = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        n_val = min(max(round(len(members) * val_split), 1 if len(members) >= 2 else 0), len(members) - 1)
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    if not val:
        raise DataError(f"{where}: too few images to split off a val set (every class has one image)")
    return sorted(train), sorted(val)


def sizes(train, val, num_classes: int) -> str:
    """``"N train / M val images, K classes"`` for a description; ``?`` where a set streams."""
    parts = [(d, s) for d, s in ((train, "train"), (val, "val")) if d is not None]
    sizes = " / ".join(f"{len(d)} {s}" if hasattr(d, "__len__") else f"? {s}" for d, s in parts)
    return f"{sizes} images, {num_classes} classes"

