"""The image-folder data form: class folders of image files, read with PIL when first used.

``train/`` and ``val/`` (or ``validation/``) folders of class folders with the same class
names, or one folder of class folders split by a seeded stratified ``val_split``. Images are
found recursively inside each class folder by extension. Unreadable images are skipped when
first loaded, never at scan time (scanning stays a directory listing): the item is replaced by
the next readable one, the file is named in a warning once, and the count is shared with
DataLoader workers.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..utils import first_line
from .bundle import DataBundle, sizes, stratified_split
from .transforms import Transforms

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")
_VAL_FOLDERS = ("val", "validation")


class _ImageFiles(Dataset):
    """``(path, label)`` samples read with PIL; unreadable files are flagged once and replaced."""

    def __init__(self, samples, transform, root):
        if not samples:
            raise DataError(f"no images under {root}")
        self.samples, self.transform, self.root = samples, transform, root
        self._bad = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()  # seen by DataLoader workers

    def __len__(self):
        return len(self.samples)

    @property
    def skipped(self) -> int:
        return int(self._bad.sum())

    def __getitem__(self, index):
        from PIL import Image

        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                with Image.open(path) as img:
                    img.load()
                    return self.transform(img), label
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
                self._bad[i] = 1
                _log.warning("skipping unreadable image %s (%s)", path, first_line(e))
        raise DataError(f"no readable images under {self.root}: all {n} failed to load")

# ---------------------------------------------------------------------------------------- image folders

def _subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _scan_classes(folder: Path) -> dict[str, list[str]]:
    """Class name -> sorted image paths; a one-line DataError for an empty folder or class."""
    classes = _subfolders(folder)
    if not classes:
        loose = _images_in(folder)
        if loose:
            raise DataError(f"data folder {folder} has {len(loose)} images but no class folders; "
                            "put each class's images in its own sub-folder")
        raise DataError(f"data folder {folder} is empty: expected class folders, train/ and val/ folders of class "
                        "folders, or MNIST-style IDX files")
    found = {c.name: _images_in(c) for c in classes}
    empty = [name for name, paths in found.items() if not paths]
    if empty:
        shown = _listed([str(folder / name) for name in empty], 3)
        raise DataError(f"class folder {shown} has no images (looked for {', '.join(IMAGE_EXTENSIONS[:6])}, ...)")
    if len(found) < 2:
        raise DataError(f"data folder {folder} has one class folder ({classes[0].name}); a classifier needs at "
                        "least two")
    return found


def load_folder(root: Path, transforms: Transforms, val_split: float, seed: int,
                 val_from_train: bool = False) -> DataBundle:
    sub = {p.name: p for p in _subfolders(root)}
    val_dir = next((sub[n] for n in _VAL_FOLDERS if n in sub), None)
    if val_from_train and "train" in sub:  # the val/ folder stays unseen
        return load_folder(sub["train"], transforms, val_split, seed)
    if "train" in sub or val_dir is not None:
        if "train" not in sub:
            raise DataError(f"data folder {root} has {val_dir.name}/ but no train/ folder")
        if val_dir is None:
            raise DataError(f"data folder {root} has train/ but no val/ folder; add val/ with the same class "
                            f"folders, or pass {root / 'train'} to split it by --val-split")
        train_found, val_found = _scan_classes(sub["train"]), _scan_classes(val_dir)
        if set(train_found) != set(val_found):
            only_train = sorted(set(train_found) - set(val_found))
            only_val = sorted(set(val_found) - set(train_found))
            raise DataError(f"class folders differ between {sub['train']} and {val_dir}: "
                            f"only in train: {_listed(only_train)}; only in {val_dir.name}: {_listed(only_val)}")
        names = list(train_found)
        train, val = _labelled(names, train_found), _labelled(names, val_found)
        how = f"{val_dir.name}/ folder"
    else:
        found = _scan_classes(root)
        names = list(found)
        samples = _labelled(names, found)
        train_idx, val_idx = stratified_split([c for _, c in samples], val_split, seed, root)
        train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
        how = f"{val_split:g} split, seed {seed}"
    bundle_train = _ImageFiles(train, transforms(train=True), root)
    bundle_val = _ImageFiles(val, transforms(train=False), root)
    text = f"image folder {root}: {sizes(train, val, len(names))} (val: {how})"
    return DataBundle(bundle_train, bundle_val, len(names), names, text)


def _labelled(names: list[str], found: dict[str, list[str]]) -> list[tuple[str, int]]:
    """``(path, class index)`` samples, class ``names[c]`` numbered ``c``."""
    return [(p, c) for c, n in enumerate(names) for p in found[n]]


def _listed(names: list[str], most: int = 8) -> str:
    """``"a, b, c and N more"`` showing at most ``most`` names; ``"none"`` for none."""
    if not names:
        return "none"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
