"""The ``--data`` forms: image folders, MNIST-style IDX folders, ``synthetic:`` and timm names.

``load_data(spec, data_config=...)`` turns a spec into a :class:`DataBundle` of train and val
datasets whose items are ``(normalised float tensor C x H x W, int label)``;
``make_loader`` wraps one in a deterministic ``DataLoader``. The forms, tried in this order:

- ``synthetic:[classes=10,train=2000,val=500,seed=0,size=H]``: generated, no download. Class
  ``c`` is an oriented sinusoidal grating (orientation ``c % 3``: vertical, horizontal or a
  random diagonal; frequency ``c % 4``) under a Gaussian blob (size ``c % 5``), with random
  colours, phase, position and pixel noise. The cues survive horizontal flips and
  translation and the mean colour carries almost none of them, so a small CNN must look at
  texture. Sample ``i`` is a pure function of ``(seed, split, i)``; generated as tensors at
  the data_config input size (``size=`` overrides it), no PIL. Train augmentation: a random
  horizontal flip from torch's RNG (probability ``train_transform_kwargs['hflip']``, default 0.5;
  other transform options do not apply). At most 60 classes (the cue combinations).
- a folder holding ``train-images*idx3-ubyte[.gz]`` and ``train-labels*idx1-ubyte[.gz]``
  (e.g. Debian's ``dataset-fashion-mnist`` at /usr/share/datasets/fashion-mnist). Val is the
  ``t10k-*`` (or ``test-*``) pair when present, else (or with ``val_from_train=True``) a seeded stratified
  ``val_split`` of train. Class names are ``"0"``.. ``str(max label)``.
- an image folder: ``train/`` and ``val/`` (or ``validation/``) folders of class folders with
  the same class names, or one folder of class folders split by a seeded stratified
  ``val_split``. Images are found recursively inside each class folder by extension.
- ``PREFIX/NAME[:ROOT]`` with a timm prefix (``torch/``, ``hfds/``, ``hfids/``, ``tfds/``,
  ``wds/``) goes to ``timm.data.create_dataset(name, root=ROOT, split='train' / 'validation'
  (then 'test'), download=True)``; ROOT defaults to ``~/.cache/flexsurgeon/datasets/NAME``.

Images pass through timm's transforms (``create_transform`` with the model's data_config).
Grayscale, palette, CMYK and RGBA (composited on white) images become RGB, or L when
``in_chans == 1``; 16-bit and 32-bit images are scaled to 8 bits, not clipped; other channel
counts repeat the RGB channels. Unreadable images are skipped when first loaded, never at
scan time (scanning stays a directory listing): the item is replaced by the next readable
one, the file is named in a warning once, and ``DataBundle.skipped`` counts them across
DataLoader workers. Problems with the spec or layout raise a one-line ``DataError``.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from .errors import DataError

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga")
SYNTHETIC_DEFAULTS = {"classes": 10, "train": 2000, "val": 500, "seed": 0, "size": None}
SYNTHETIC_MAX_CLASSES = 60  # distinct (orientation % 3, frequency % 4, blob % 5) combinations
TIMM_PREFIXES = ("torch/", "hfds/", "hfids/", "tfds/", "wds/")
_VAL_FOLDERS = ("val", "validation")
_MASK64 = (1 << 64) - 1


@dataclass
class DataBundle:
    """Train and val datasets of ``(float tensor C x H x W, int label)`` plus what logs need."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    description: str

    @property
    def skipped(self) -> int:
        """Unreadable images skipped so far, in this process and its DataLoader workers."""
        return _skipped(self.train) + _skipped(self.val)


def _skipped(dataset) -> int:
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
    picked = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(_mix(seed, 0x5B5E7))).tolist()
    subset = Subset(data.train, sorted(picked[:size]))
    return DataBundle(subset, data.val, data.num_classes, data.class_names,
                      f"{data.description}; training on a seeded subset of {size}")


# ---------------------------------------------------------------------------------------- entry point

def load_data(spec: str, *, data_config: dict, in_chans: int = 3, val_split: float = 0.1, seed: int = 0,
              train_transform_kwargs: dict | None = None, val_from_train: bool = False) -> DataBundle:
    """Resolve a ``--data`` spec into train and val datasets (see the module docstring for forms).

    ``data_config`` is ``timm.data.resolve_data_config(model=model)``; its mean/std are
    repeated or trimmed to ``in_chans``. ``train_transform_kwargs`` go to timm's
    ``create_transform(is_training=True)`` (``synthetic:`` reads only ``hflip``). ``val_split`` and
    ``seed`` carve val out of train where the data has no val part of its own, and also where it
    has one when ``val_from_train`` (to choose settings without looking at a test split).
    """
    spec = str(spec).strip()
    if not spec:
        raise DataError(f"--data is empty; {_FORMS}")
    if in_chans < 1:
        raise DataError(f"in_chans must be at least 1, got {in_chans}")
    if spec.startswith("synthetic:") or (spec == "synthetic" and not os.path.exists(spec)):
        return _load_synthetic(spec, data_config, in_chans, (train_transform_kwargs or {}).get("hflip", 0.5))
    transforms = _Transforms(data_config, in_chans, train_transform_kwargs)
    if spec.lower().startswith(TIMM_PREFIXES) and not os.path.exists(spec):
        return _load_timm(spec, transforms)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"--data {spec}: no such file or folder; {_FORMS}")
    if not root.is_dir():
        raise DataError(f"--data {spec} is a file, not a folder; pass the folder that holds the data")
    if _find_idx(root, "train", "images", required=False) is not None:
        return _load_idx(root, transforms, val_split, seed, val_from_train)
    return _load_folder(root, transforms, val_split, seed, val_from_train)


_FORMS = ("use an image folder (train/ + val/ class folders, or class folders), a folder of MNIST-style IDX "
          "files, synthetic: (no download) or a timm dataset such as torch/cifar10:ROOT")


# ---------------------------------------------------------------------------------------- synthetic

def parse_synthetic(spec: str) -> dict:
    """``"synthetic:classes=4,train=256"`` -> all keys with defaults filled in; bad keys raise DataError."""
    body = spec.strip()
    body = body[len("synthetic"):] if body.startswith("synthetic") else body
    body = body[1:] if body.startswith(":") else body
    options = dict(SYNTHETIC_DEFAULTS)
    valid = ", ".join(SYNTHETIC_DEFAULTS)
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if key not in SYNTHETIC_DEFAULTS:
            raise DataError(f"unknown synthetic key {key!r} in {spec!r}; valid keys: {valid}")
        if not sep:
            raise DataError(f"synthetic key {key!r} in {spec!r} needs a value, e.g. {key}=10")
        try:
            options[key] = int(value)
        except ValueError:
            raise DataError(f"synthetic {key}={value.strip()!r} in {spec!r} is not an integer") from None
    lowest = {"classes": 2, "train": 1, "val": 1, "seed": 0, "size": 8}
    for key, low in lowest.items():
        if options[key] is not None and options[key] < low:
            raise DataError(f"synthetic {key}={options[key]} in {spec!r} must be at least {low}")
    if options["classes"] > SYNTHETIC_MAX_CLASSES:
        raise DataError(f"synthetic classes={options['classes']} in {spec!r}: at most {SYNTHETIC_MAX_CLASSES} "
                        "classes can be told apart; use a real data set for more")
    return options


class _SyntheticImages(Dataset):
    """Sample ``i`` of ``split`` is generated from a generator seeded by ``(seed, split, i)``."""

    _CYCLES = (2.0, 3.5, 5.5, 8.0)  # grating cycles per image, by class % 4
    _SIGMAS = (0.05, 0.08, 0.11, 0.15, 0.20)  # blob radius as a fraction of the image, by class % 5

    def __init__(self, length, split, num_classes, seed, size, mean, std, hflip):
        self.length, self.num_classes, self.seed, self.size, self.hflip = length, num_classes, seed, size, hflip
        self.split_id = {"train": 1, "val": 2}[split]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        height, width = size
        self._ys = torch.linspace(-0.5, 0.5, height)
        self._xs = torch.linspace(-0.5, 0.5, width)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        label = index % self.num_classes
        image = self._generate(index, label)
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            image = image.flip(-1)
        return image.sub_(self.mean).div_(self.std), label

    def _generate(self, index, label):
        g = torch.Generator().manual_seed(_mix(self.seed, self.split_id, index))
        chans = self.mean.shape[0]
        r = torch.rand(6, generator=g).tolist()
        ys, xs = self._ys, self._xs
        # grating sin(a x + b y + phase), separable: sin(ax)cos(by+p) + cos(ax)sin(by+p)
        theta = (0.0, math.pi / 2, math.pi / 4 if r[0] < 0.5 else -math.pi / 4)[label % 3] + (r[1] - 0.5) * 0.5
        k = 2 * math.pi * self._CYCLES[label % 4] * (1 + (r[2] - 0.5) * 0.3)
        ax, by = k * math.cos(theta) * xs, k * math.sin(theta) * ys + r[3] * 2 * math.pi
        grating = torch.outer(by.cos(), ax.sin()) + torch.outer(by.sin(), ax.cos())
        sigma = self._SIGMAS[label % 5]
        cy, cx = (r[4] - 0.5) * 0.5, (r[5] - 0.5) * 0.5
        blob = torch.outer(torch.exp(-((ys - cy) ** 2) / (2 * sigma**2)), torch.exp(-((xs - cx) ** 2) / (2 * sigma**2)))
        sign = torch.randint(0, 2, (chans,), generator=g) * 2 - 1
        grating_colour = sign * (0.4 + 0.6 * torch.rand(chans, generator=g))
        blob_colour = torch.rand(chans, generator=g) - 0.5
        image = torch.randn(chans, *self.size, generator=g).mul_(0.3).add_(0.5)
        image.addcmul_(grating_colour.view(-1, 1, 1), grating, value=0.12)
        image.addcmul_(blob_colour.view(-1, 1, 1), blob, value=0.5)
        return image.clamp_(0.0, 1.0)


def _load_synthetic(spec, data_config, in_chans, hflip) -> DataBundle:
    options = parse_synthetic(spec)
    size = _input_hw(data_config) if options["size"] is None else (options["size"], options["size"])
    mean, std = _per_channel(data_config.get("mean"), in_chans), _per_channel(data_config.get("std"), in_chans)
    common = dict(num_classes=options["classes"], seed=options["seed"], size=size, mean=mean, std=std)
    train = _SyntheticImages(options["train"], "train", hflip=float(hflip), **common)
    val = _SyntheticImages(options["val"], "val", hflip=0.0, **common)
    names = [str(c) for c in range(options["classes"])]
    text = (f"synthetic: {len(train)} train / {len(val)} val images, {len(names)} classes, "
            f"{in_chans}x{size[0]}x{size[1]}, seed {options['seed']}")
    return DataBundle(train, val, len(names), names, text)


# ---------------------------------------------------------------------------------------- PIL images + timm transforms

def _to_pil_mode(img, mode):
    """Any PIL image -> ``mode`` ('RGB' or 'L'): alpha composited on white, 16/32-bit scaled to 8-bit."""
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16"):
            scale = 65535.0
        elif img.mode == "F":
            scale = 1.0 if a.size == 0 or a.max() <= 1.0 else 65535.0
        else:  # 'I': 32-bit container, usually 16-bit data (older Pillow opens 16-bit PNGs so)
            scale = 65535.0 if a.size and a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / scale) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == mode else img.convert(mode)


class _Transforms:
    """timm transforms for PIL images, built once from the model's data_config."""

    def __init__(self, data_config, in_chans, train_kwargs):
        self.in_chans = in_chans
        self.mode = "L" if in_chans == 1 else "RGB"
        self.config = dict(data_config)
        self.train_kwargs = dict(train_kwargs or {})
        self._built = None

    def _build(self):
        from timm.data import create_transform

        pil_chans = 1 if self.mode == "L" else 3
        config = {k: v for k, v in self.config.items() if k in ("input_size", "interpolation", "mean", "std",
                                                                  "crop_pct", "crop_mode")}
        config["input_size"] = (pil_chans, *_input_hw(self.config))
        config["mean"] = _per_channel(self.config.get("mean"), pil_chans)
        config["std"] = _per_channel(self.config.get("std"), pil_chans)
        try:
            train = create_transform(**{**config, **self.train_kwargs}, is_training=True)
        except TypeError as e:
            raise DataError(f"bad train transform option: {e}") from None
        return train, create_transform(**config, is_training=False)

    def __call__(self, train: bool):
        if self._built is None:
            self._built = self._build()
        return _PilPipeline(self._built[0 if train else 1], self.mode, self.in_chans)


class _PilPipeline:
    """PIL image -> mode conversion -> timm transform -> channels repeated to in_chans."""

    def __init__(self, transform, mode, in_chans):
        self.transform, self.mode, self.in_chans = transform, mode, in_chans

    def __call__(self, img):
        x = self.transform(_to_pil_mode(img, self.mode))
        if x.shape[0] != self.in_chans:
            x = x[[c % x.shape[0] for c in range(self.in_chans)]]
        return x


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
                _log.warning("skipping unreadable image %s (%s)", path, str(e).splitlines()[0] if str(e) else
                             type(e).__name__)
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
        shown = ", ".join(str(folder / name) for name in empty[:3]) + (f" and {len(empty) - 3} more"
                                                                      if len(empty) > 3 else "")
        raise DataError(f"class folder {shown} has no images (looked for {', '.join(IMAGE_EXTENSIONS[:6])}, ...)")
    if len(found) < 2:
        raise DataError(f"data folder {folder} has one class folder ({classes[0].name}); a classifier needs at "
                        "least two")
    return found


def _load_folder(root: Path, transforms: _Transforms, val_split: float, seed: int,
                 val_from_train: bool = False) -> DataBundle:
    sub = {p.name: p for p in _subfolders(root)}
    val_dir = next((sub[n] for n in _VAL_FOLDERS if n in sub), None)
    if val_from_train and "train" in sub:  # the val/ folder stays unseen
        return _load_folder(sub["train"], transforms, val_split, seed)
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
                            f"only in train: {_names(only_train)}; only in {val_dir.name}: {_names(only_val)}")
        names = list(train_found)
        train = [(p, c) for c, n in enumerate(names) for p in train_found[n]]
        val = [(p, c) for c, n in enumerate(names) for p in val_found[n]]
        how = f"{val_dir.name}/ folder"
    else:
        found = _scan_classes(root)
        names = list(found)
        samples = [(p, c) for c, n in enumerate(names) for p in found[n]]
        train_idx, val_idx = _stratified_split([c for _, c in samples], val_split, seed, root)
        train, val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
        how = f"{val_split:g} split, seed {seed}"
    bundle_train = _ImageFiles(train, transforms(train=True), root)
    bundle_val = _ImageFiles(val, transforms(train=False), root)
    text = f"image folder {root}: {len(train)} train / {len(val)} val images, {len(names)} classes (val: {how})"
    return DataBundle(bundle_train, bundle_val, len(names), names, text)


def _names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"


def _stratified_split(labels, val_split, seed, where) -> tuple[list[int], list[int]]:
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


# ---------------------------------------------------------------------------------------- IDX (MNIST format)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _find_idx(root: Path, split: str, kind: str, required: bool = True) -> Path | None:
    dims = "idx3" if kind == "images" else "idx1"
    split_re = "(?:t10k|test)" if split == "t10k" else split  # some copies name the test files test-*
    pattern = re.compile(rf"(^|[-_.]){split_re}[-_.]{kind}[-_.]{dims}[-_.]ubyte(\.gz)?$")
    hits = sorted(p for p in root.iterdir() if p.is_file() and pattern.search(p.name))
    if len(hits) > 1:
        plain = [p for p in hits if p.suffix != ".gz"]  # the same file unpacked and packed: take the unpacked
        if len(plain) != 1:
            raise DataError(f"IDX folder {root} has several {split} {kind} files: {', '.join(p.name for p in hits)}")
        hits = plain
    if not hits and required:
        raise DataError(f"IDX folder {root} has no {split}-{kind}-{dims}-ubyte[.gz] file")
    return hits[0] if hits else None


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped); DataError when corrupt or truncated."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"IDX file {path} has a truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"IDX file {path} is truncated or corrupt: shape {shape} needs {expected} bytes of data, "
                        f"found {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _read_idx_pair(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _find_idx(root, split, "images"), _find_idx(root, split, "labels")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected N x H x W unsigned bytes, got shape {images.shape} {images.dtype}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: expected N integer labels, got shape {labels.shape} {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{images_path.name} has {len(images)} images but {labels_path.name} has {len(labels)} labels")
    if len(labels) == 0 or labels.min() < 0:
        raise DataError(f"{labels_path} has no labels or negative ones")
    return images, labels.astype(np.int64)


class _IdxImages(Dataset):
    """Gray images held in memory as uint8; ``indices`` selects a split."""

    def __init__(self, images, labels, indices, transform):
        self.images, self.labels, self.indices, self.transform = images, labels, np.asarray(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        from PIL import Image

        i = int(self.indices[index])
        return self.transform(Image.fromarray(self.images[i], "L")), int(self.labels[i])


def _load_idx(root, transforms, val_split, seed, val_from_train) -> DataBundle:
    images, labels = _read_idx_pair(root, "train")
    has_test = _find_idx(root, "t10k", "images", required=False) is not None
    if has_test and not val_from_train:
        val_images, val_labels = _read_idx_pair(root, "t10k")
        train_idx, val_idx = np.arange(len(labels)), np.arange(len(val_labels))
        how = "t10k files"
    else:
        train_idx, val_idx = _stratified_split(labels, val_split, seed, root)
        val_images, val_labels = images, labels
        how = f"{val_split:g} split of train, seed {seed}"
    num_classes = int(max(labels.max(), val_labels.max())) + 1
    names = [str(c) for c in range(num_classes)]
    train = _IdxImages(images, labels, train_idx, transforms(train=True))
    val = _IdxImages(val_images, val_labels, val_idx, transforms(train=False))
    text = (f"IDX folder {root}: {len(train)} train / {len(val)} val images, {num_classes} classes, "
            f"{images.shape[1]}x{images.shape[2]} gray (val: {how})")
    return DataBundle(train, val, num_classes, names, text)


# ---------------------------------------------------------------------------------------- timm passthrough

def _load_timm(spec, transforms: _Transforms) -> DataBundle:
    name, _, root = spec.partition(":")
    root = root or str(Path("~/.cache/flexsurgeon/datasets").expanduser() / re.sub(r"[^\w.-]+", "_", name))
    hint = "no network? use synthetic: or a local image / IDX folder"

    def create(split, transform):
        from timm.data import create_dataset

        try:
            return create_dataset(name, root=root, split=split, download=True, is_training=split == "train",
                                  input_img_mode=transforms.mode, transform=transform)
        except DataError:
            raise
        except Exception as e:  # anything the backend raises: network, missing package, unknown name
            raise DataError(f"--data {spec}: timm could not load split {split!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from None

    train = create("train", transforms(train=True))
    try:
        val = create("validation", transforms(train=False))
    except DataError:
        val = create("test", transforms(train=False))
    names = _timm_class_names(train)
    if names is None:
        raise DataError(f"--data {spec}: cannot tell the number of classes of this data set; {hint}")
    sizes = " / ".join(f"{len(d)} {s}" if hasattr(d, "__len__") else f"? {s}" for d, s in ((train, "train"),
                                                                                         (val, "val")))
    return DataBundle(train, val, len(names), names, f"timm dataset {name} at {root}: {sizes} images, "
                                                     f"{len(names)} classes")


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


# ---------------------------------------------------------------------------------------- loaders

def make_loader(dataset, *, batch_size: int, train: bool, seed: int, epoch: int = 0, num_workers: int = 0,
                distributed: bool = False, pin_memory: bool = False, drop_last: bool | None = None,
                num_replicas: int | None = None, rank: int | None = None) -> DataLoader:
    """A DataLoader whose batches depend only on ``(seed, epoch)`` (and the rank when distributed).

    The sample order comes from a generator seeded by ``(seed, epoch)`` (``DistributedSampler``
    with ``seed`` and ``set_epoch(epoch)`` when ``distributed``; ``num_replicas`` / ``rank``
    default to the process group's; a distributed evaluation loader gives each rank every
    ``num_replicas``-th sample, unpadded, so summed metrics count every sample once). Every
    sample's augmentation runs with torch's, Python's and numpy's RNGs seeded from
    ``(seed, epoch, index)`` and restored afterwards, so a batch is the same whatever
    ``num_workers`` is, and a loader rebuilt after a resume repeats the uninterrupted run.
    ``loader.sampler.set_epoch(e)`` moves a loader (and its persistent workers) to epoch
    ``e``. ``drop_last`` defaults to ``train``, but never drops every batch. Iterable
    datasets (streaming timm sets) get a plain loader; their order is the reader's.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    worker_args = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                       worker_init_fn=_seed_worker if num_workers > 0 else None,
                       generator=torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED)))
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, drop_last=bool(drop_last), **worker_args)
    if distributed and train:
        sampler = _KeyedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                           drop_last=False)
    elif distributed:
        # Evaluation: each sample on exactly one rank. DistributedSampler would pad the
        # shards to equal length by repeating samples, which the summed metrics count twice.
        import torch.distributed as tdist

        world = num_replicas if num_replicas is not None else tdist.get_world_size()
        sampler = _KeyedSampler(len(dataset), shuffle=False, seed=seed,
                                shard=(rank if rank is not None else tdist.get_rank(), world))
    else:
        sampler = _KeyedSampler(len(dataset), shuffle=train, seed=seed)
    sampler.set_epoch(epoch)
    if drop_last is None:
        drop_last = train and len(sampler) >= batch_size
    return DataLoader(_SeededView(dataset, seed), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      **worker_args)


def _mix(*parts: int) -> int:
    """A well-spread 63-bit seed from a tuple of ints (splitmix64 over the parts)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed()  # DataLoader derives it from the loader's (seed, epoch) generator
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


@contextmanager
def _seeded_rngs(seed: int):
    """Seed torch's CPU, Python's and numpy's global RNGs; restore them afterwards."""
    torch_state, py_state, np_state = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class _SeededView(Dataset):
    """Reads ``(index, epoch)`` keys from the keyed samplers and seeds each sample's augmentation."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    @property
    def skipped(self) -> int:
        return _skipped(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.dataset[key]
        index, epoch = key
        with _seeded_rngs(_mix(self.seed, epoch, index)):
            return self.dataset[index]


class _KeyedSampler(Sampler):
    """Shuffled (or sequential) indices, as ``(index, epoch)``; the order depends on ``(seed, epoch)`` only.

    ``shard=(rank, world)`` keeps every ``world``-th position of that order from ``rank`` on.
    """

    def __init__(self, length, shuffle, seed, shard: tuple[int, int] = (0, 1)):
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, seed, 0
        self.rank, self.world = shard

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(range(self.rank, self.length, self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        else:
            order = torch.arange(self.length)
        return ((i, self.epoch) for i in order[self.rank::self.world].tolist())


class _KeyedDistributedSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, epoch)`` keys for :class:`_SeededView`."""

    def __iter__(self):
        epoch = self.epoch
        return ((i, epoch) for i in super().__iter__())


def _input_hw(data_config) -> tuple[int, int]:
    size = data_config.get("input_size", (3, 224, 224))
    if isinstance(size, int):
        return size, size
    return int(size[-2]), int(size[-1])


def _per_channel(values, chans) -> tuple[float, ...]:
    values = tuple(values) if values is not None else (0.5,)
    return tuple(float(values[c % len(values)]) for c in range(chans))
