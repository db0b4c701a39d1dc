"""The model's data_config read for the data forms, and PIL images through timm's transforms.

Grayscale, palette, CMYK and RGBA (composited on white) images become RGB, or L when
``in_chans == 1``; 16-bit and 32-bit images are scaled to 8 bits, not clipped; other channel
counts repeat the RGB channels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from timm.data import create_transform

from ..errors import DataError
from ..utils import per_channel


def input_hw(data_config) -> tuple[int, int]:
    size = data_config.get("input_size", (3, 224, 224))
    if isinstance(size, int):
        return size, size
    return int(size[-2]), int(size[-1])


def _to_pil_mode(img, mode):
    """Any PIL image -> ``mode`` ('RGB' or 'L'): alpha composited on white, 16/32-bit scaled to 8-bit."""

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


class Transforms:
    """timm transforms for PIL images, built once from the model's data_config."""

    def __init__(self, data_config, in_chans, train_kwargs):
        self.in_chans = in_chans
        self.mode = "L" if in_chans == 1 else "RGB"
        self.config = dict(data_config)
        self.train_kwargs = dict(train_kwargs or {})
        self._built = None

    def _build(self):
        pil_chans = 1 if self.mode == "L" else 3
        config = {k: v for k, v in self.config.items() if k in ("input_size", "interpolation", "mean", "std",
                                                                  "crop_pct", "crop_mode")}
        config["input_size"] = (pil_chans, *input_hw(self.config))
        config["mean"] = per_channel(self.config.get("mean") or (0.5,), pil_chans)
        config["std"] = per_channel(self.config.get("std") or (0.5,), pil_chans)
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
