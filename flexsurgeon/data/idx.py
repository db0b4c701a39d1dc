"""The IDX data form: a folder of MNIST-style ``idx3`` images and ``idx1`` labels, held in memory.

``train-images*idx3-ubyte[.gz]`` and ``train-labels*idx1-ubyte[.gz]`` (e.g. Debian's
``dataset-fashion-mnist`` at /usr/share/datasets/fashion-mnist). Val is the ``t10k-*`` (or
``test-*``) pair when present, else (or with ``val_from_train``) a seeded stratified
``val_split`` of train. Class names are ``"0"``.. ``str(max label)``.
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from .bundle import DataBundle, sizes, stratified_split

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def find_idx(root: Path, split: str, kind: str, required: bool = True) -> Path | None:
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


def read_idx(path: Path) -> np.ndarray:
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
    images_path, labels_path = find_idx(root, split, "images"), find_idx(root, split, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
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
        i = int(self.indices[index])
        return self.transform(Image.fromarray(self.images[i], "L")), int(self.labels[i])


def load_idx(root, transforms, val_split, seed, val_from_train) -> DataBundle:
    images, labels = _read_idx_pair(root, "train")
    has_test = find_idx(root, "t10k", "images", required=False) is not None
    if has_test and not val_from_train:
        val_images, val_labels = _read_idx_pair(root, "t10k")
        train_idx, val_idx = np.arange(len(labels)), np.arange(len(val_labels))
        how = "t10k files"
    else:
        train_idx, val_idx = stratified_split(labels, val_split, seed, root)
        val_images, val_labels = images, labels
        how = f"{val_split:g} split of train, seed {seed}"
    num_classes = int(max(labels.max(), val_labels.max())) + 1
    names = [str(c) for c in range(num_classes)]
    train = _IdxImages(images, labels, train_idx, transforms(train=True))
    val = _IdxImages(val_images, val_labels, val_idx, transforms(train=False))
    text = (f"IDX folder {root}: {sizes(train, val, num_classes)}, {images.shape[1]}x{images.shape[2]} gray "
            f"(val: {how})")
    return DataBundle(train, val, num_classes, names, text, val_carved=not (has_test and not val_from_train))
