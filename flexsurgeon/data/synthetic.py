"""The ``synthetic:[classes=10,train=2000,val=500,seed=0,size=H,noise=0.3]`` data form: generated, no download.

Class ``c`` is an oriented sinusoidal grating (orientation ``c % 3``: vertical, horizontal or a
random diagonal; frequency ``c % 4``) under a Gaussian blob (size ``c % 5``), with random
colours, phase, position and pixel noise. The cues survive horizontal flips and translation
and the mean colour carries almost none of them, so a small CNN must look at texture. Sample
``i`` is a pure function of ``(seed, split, i)``; generated as tensors at the data_config input
size (``size=`` overrides it), no PIL. Train augmentation: a random horizontal flip from
torch's RNG (probability ``hflip``). At most 60 classes (the cue combinations).

``noise`` is the pixel noise's standard deviation (images lie in [0, 1]). The default makes a
set that takes a random-init CNN many epochs; ``noise=0.05`` makes one it learns in a few,
which is what the quickstart shows.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..utils import per_channel
from .bundle import DataBundle, sizes
from .seeds import generator
from .transforms import input_hw

SYNTHETIC_DEFAULTS = {"classes": 10, "train": 2000, "val": 500, "seed": 0, "size": None, "noise": 0.3}
SYNTHETIC_MAX_CLASSES = 60  # distinct (orientation % 3, frequency % 4, blob % 5) combinations


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
        kind = float if key == "noise" else int
        try:
            options[key] = kind(value)
        except ValueError:
            what = "a number" if kind is float else "an integer"
            raise DataError(f"synthetic {key}={value.strip()!r} in {spec!r} is not {what}") from None
    if not 0.0 <= options["noise"] <= 1.0:
        raise DataError(f"synthetic noise={options['noise']:g} in {spec!r} must be between 0 and 1")
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

    def __init__(self, length, split, num_classes, seed, size, mean, std, hflip, noise):
        self.length, self.num_classes, self.seed, self.size, self.hflip = length, num_classes, seed, size, hflip
        self.noise = noise
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
        g = generator(self.seed, self.split_id, index)
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
        image = torch.randn(chans, *self.size, generator=g).mul_(self.noise).add_(0.5)
        image.addcmul_(grating_colour.view(-1, 1, 1), grating, value=0.12)
        image.addcmul_(blob_colour.view(-1, 1, 1), blob, value=0.5)
        return image.clamp_(0.0, 1.0)


def load_synthetic(spec, data_config, in_chans, hflip) -> DataBundle:
    options = parse_synthetic(spec)
    size = input_hw(data_config) if options["size"] is None else (options["size"], options["size"])
    mean = per_channel(data_config.get("mean") or (0.5,), in_chans)
    std = per_channel(data_config.get("std") or (0.5,), in_chans)
    common = dict(num_classes=options["classes"], seed=options["seed"], size=size, mean=mean, std=std,
                  noise=options["noise"])
    train = _SyntheticImages(options["train"], "train", hflip=float(hflip), **common)
    val = _SyntheticImages(options["val"], "val", hflip=0.0, **common)
    names = [str(c) for c in range(options["classes"])]
    text = (f"synthetic: {sizes(train, val, len(names))}, {in_chans}x{size[0]}x{size[1]}, seed {options['seed']}, "
            f"noise {options['noise']:g}")
    return DataBundle(train, val, len(names), names, text)
