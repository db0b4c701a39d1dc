"""The image-folder data form: class folders of image files, read with PIL.

``train/`` and ``val/`` (or ``validation/``) folders of class folders with the same class
names, or one folder of class folders split by a seeded stratified ``val_split``. Images are
found recursively inside each class folder by extension, following symlinked folders (a common
way to assemble a data set) but never into a folder read already: a symlink that loops back into
the data folder or re-enters a folder is skipped, with one warning that counts and names them.

The scan opens each image's header (nothing is decoded) and leaves out the files PIL cannot
open, with one warning naming the first few; the data set and its sizes hold only the rest. A
file that opens but fails to decode later (truncated data) is left out of its batch, never
replaced by another image: the item is ``None``, which the loaders' collate function drops.
Both kinds count in ``DataBundle.skipped``, across DataLoader workers.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from ..errors import DataError
from ..utils import first_line
from .bundle import DataBundle, sizes, stratified_split
from .transforms import Transforms

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")
_VAL_FOLDERS = ("val", "validation")
_PROGRESS_FROM = 2000  # header checks of more files than this show a progress bar (on a terminal)
_NAMED = 5  # unreadable files and skipped symlinks named in a warning
_CHUNK = 256  # image headers checked per thread task


class _ImageFiles(Dataset):
    """``(path, label)`` samples read with PIL; an item that fails to decode is ``None`` (flagged once)."""

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
        if self._bad[index]:
            return None
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                return self.transform(img), label
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            self._bad[index] = 1
            _log.warning("left out %s: it fails to decode (%s)", path, first_line(e))
        if self.skipped == len(self.samples):
            raise DataError(f"no readable images under {self.root}: all {len(self.samples)} failed to load")
        return None

# ---------------------------------------------------------------------------------------- image folders

class _Scan:
    """One data folder's scan: the folders read as data, and what was left out, for the warnings."""

    def __init__(self, root: Path, containers: list[Path]):
        self.root = root
        classes = [c for folder in containers for c in _subfolders(folder)]
        # A symlink into (or above) any of these would read some images twice, or under another class.
        self.containers = [os.path.realpath(p) for p in containers]
        self.fences = [*self.containers, *(os.path.realpath(p) for p in classes)]
        self.loops: list[str] = []
        self.unreadable: list[tuple[str, str]] = []

    def name(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def warn(self) -> None:
        if self.loops:
            n = len(self.loops)
            _log.warning("skipped %d symlinked folder%s that loop%s back into the data folder or into a folder "
                         "read already: %s", n, "s" if n > 1 else "", "" if n > 1 else "s",
                         _listed([self.name(p) for p in self.loops], _NAMED))
        if self.unreadable:
            n = len(self.unreadable)
            _log.warning("left out %d unreadable image%s under %s: %s", n, "s" if n > 1 else "", self.root,
                         _listed([f"{self.name(p)} ({why})" for p, why in self.unreadable], _NAMED))


def _subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _inside(path: str, folder: str) -> bool:
    return path == folder or os.path.commonpath([path, folder]) == folder


def _images_in(folder: Path, scan: _Scan | None = None) -> list[str]:
    """Image files under ``folder``, sorted. Symlinked folders are followed, except back up the
    walk, into a folder read already on it, or into (or above) a folder the scan reads as data:
    those go to ``scan.loops``."""
    visited, found = {os.path.realpath(folder)}, []
    fences = scan.fences if scan is not None else [os.path.realpath(folder)]
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here, kept = os.path.realpath(dirpath), []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real in visited or (os.path.islink(path) and _loops(real, [here, *fences])):
                if scan is not None:
                    scan.loops.append(path)
                continue
            visited.add(real)
            kept.append(name)
        dirnames[:] = kept
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _loops(real: str, fences: list[str]) -> bool:
    """Whether a symlinked folder resolving to ``real`` leads into or above one of ``fences``."""
    return any(_inside(real, f) or _inside(f, real) for f in fences)


def _open_error(path: str) -> str | None:
    """Why PIL cannot open ``path``'s header (nothing is decoded); None when it can."""

    try:
        with Image.open(path):
            return None
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except OSError as e:
        return e.strerror or first_line(e).replace(repr(path), "").replace(path, "").strip(" :")
    except Exception as e:  # any failure to open a header leaves out that file, not the data set
        return first_line(e)


def _open_errors(paths: list[str]) -> list[str | None]:
    return [_open_error(path) for path in paths]


def _readable(found: dict[str, list[str]], scan: _Scan, where: Path) -> dict[str, list[str]]:
    """``found`` without the files whose header PIL cannot open (those go to ``scan.unreadable``);
    a one-line DataError when that leaves nothing, or a class with nothing."""

    paths = [p for class_paths in found.values() for p in class_paths]
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]  # not a future per file
    errors = {}
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool, \
            tqdm(total=len(paths), desc=f"checking {len(paths)} image files", unit="file", leave=False,
                 disable=None if len(paths) > _PROGRESS_FROM else True) as bar:
        for chunk, chunk_errors in zip(chunks, pool.map(_open_errors, chunks)):
            bar.update(len(chunk))
            errors.update((path, error) for path, error in zip(chunk, chunk_errors) if error is not None)
    if not errors:
        return found
    if len(errors) == len(paths):
        path, why = next(iter(errors.items()))
        raise DataError(f"no readable images under {where}: all {len(paths)} image files fail to open "
                        f"(e.g. {scan.name(path)}: {why})")
    for name, class_paths in found.items():
        if all(p in errors for p in class_paths):
            n, (path, why) = len(class_paths), next((p, errors[p]) for p in class_paths)
            raise DataError(f"no readable images under {where / name}: its {n} image{' fails' if n == 1 else 's fail'}"
                            f" to open (e.g. {scan.name(path)}: {why})")
    scan.unreadable += errors.items()
    return {name: [p for p in class_paths if p not in errors] for name, class_paths in found.items()}


def _scan_classes(folder: Path, scan: _Scan) -> dict[str, list[str]]:
    """Class name -> sorted image paths; a one-line DataError for an empty folder or class."""
    classes = _subfolders(folder)
    if not classes:
        loose = _images_in(folder)
        if loose:
            raise DataError(f"data folder {folder} has {len(loose)} images but no class folders; "
                            "put each class's images in its own sub-folder")
        raise DataError(f"data folder {folder} is empty: expected class folders, train/ and val/ folders of class "
                        "folders, or MNIST-style IDX files")
    looping = [c for c in classes if c.is_symlink() and _loops(os.path.realpath(c), scan.containers)]
    if looping:
        raise DataError(f"class folder {looping[0]} is a symlink to {os.path.realpath(looping[0])}, which would read "
                        "images of the data folder twice or under another class; link to a folder outside it")
    found = {c.name: _images_in(c, scan) for c in classes}
    empty = [name for name, paths in found.items() if not paths]
    if empty:
        shown = _listed([str(folder / name) for name in empty], 3)
        raise DataError(f"class folder {shown} has no images (looked for {', '.join(IMAGE_EXTENSIONS[:6])}, ...)")
    if len(found) < 2:
        raise DataError(f"data folder {folder} has one class folder ({classes[0].name}); a classifier needs at "
                        "least two")
    return _readable(found, scan, folder)


def load_folder(root: Path, transforms: Transforms, val_split: float, seed: int,
                val_from_train: bool = False, _top: Path | None = None) -> DataBundle:
    sub = {p.name: p for p in _subfolders(root)}
    val_dir = next((sub[n] for n in _VAL_FOLDERS if n in sub), None)
    if val_from_train and "train" in sub:  # the val/ folder stays unseen
        return load_folder(sub["train"], transforms, val_split, seed, _top=root)
    scan = _Scan(root, _containers(_top or root))
    if "train" in sub or val_dir is not None:
        if "train" not in sub:
            raise DataError(f"data folder {root} has {val_dir.name}/ but no train/ folder")
        if val_dir is None:
            raise DataError(f"data folder {root} has train/ but no val/ folder; add val/ with the same class "
                            f"folders, or pass {root / 'train'} to split it by --val-split")
        train_found, val_found = _scan_classes(sub["train"], scan), _scan_classes(val_dir, scan)
        if set(train_found) != set(val_found):
            only_train = sorted(set(train_found) - set(val_found))
            only_val = sorted(set(val_found) - set(train_found))
            raise DataError(f"class folders differ between {sub['train']} and {val_dir}: "
                            f"only in train: {_listed(only_train)}; only in {val_dir.name}: {_listed(only_val)}")
        names = list(train_found)
        train, val = _labelled(names, train_found), _labelled(names, val_found)
        how, carved = f"{val_dir.name}/ folder", False
    else:
        found = _scan_classes(root, scan)
        names = list(found)
        samples = _labelled(names, found)
        train_idx, val_idx = stratified_split([c for _, c in samples], val_split, seed, root)
        train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
        how, carved = f"{val_split:g} split, seed {seed}", True
    scan.warn()
    bundle_train = _ImageFiles(train, transforms(train=True), root)
    bundle_val = _ImageFiles(val, transforms(train=False), root)
    left_out = len(scan.unreadable)
    text = f"image folder {root}: {sizes(train, val, len(names))} (val: {how})"
    if left_out:
        text += f"; {left_out} unreadable image{'s' if left_out > 1 else ''} left out"
    return DataBundle(bundle_train, bundle_val, len(names), names, text, left_out=left_out, val_carved=carved)


def _containers(root: Path) -> list[Path]:
    """The folders of class folders in a data folder: its train/ and val/ folders, or itself."""
    sub = {p.name: p for p in _subfolders(root)}
    return [sub[n] for n in ("train", *_VAL_FOLDERS) if n in sub] or [root]


def _labelled(names: list[str], found: dict[str, list[str]]) -> list[tuple[str, int]]:
    """``(path, class index)`` samples, class ``names[c]`` numbered ``c``."""
    return [(p, c) for c, n in enumerate(names) for p in found[n]]


def _listed(names: list[str], most: int = 8) -> str:
    """``"a, b, c and N more"`` showing at most ``most`` names; ``"none"`` for none."""
    if not names:
        return "none"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
