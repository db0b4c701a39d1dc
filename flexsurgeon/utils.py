"""Small helpers shared across flexsurgeon: folder and file names, an exception's first line,
a model's train/eval mode for a block, image sizes, and single files replaced atomically.

Nothing here imports torch, so light modules (the CLI, plotting) can use it.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

HUB_PREFIX = "hf-hub:"  # a Hugging Face Hub repository, as timm.create_model names one
# a model folder's files, in timm's layout (local-dir: and hf-hub: alike)
CONFIG_NAME = "config.json"  # architecture, num_classes, pretrained_cfg (and our plan, in model_args)
WEIGHTS_NAME = "model.safetensors"


def is_hub_name(text) -> bool:
    return isinstance(text, str) and text.startswith(HUB_PREFIX)


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of ``exc``'s message, for one-line errors; ``default`` (the exception's
    type name unless given) when the message is empty."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, marked with "..."."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:") + "..."


@contextmanager
def training_mode(module, training: bool):
    """``module`` in train (``training``) or eval mode for the block; its previous mode is put
    back afterwards, also when the block raises."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


def as_size(value) -> tuple[int, int] | None:
    """``N`` or a pair ``(H, W)`` as ``(H, W)``; None unless it is one or two positive integers."""
    if isinstance(value, int):
        value = (value, value)
    try:
        size = tuple(value)
    except TypeError:
        return None
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        return None
    return size


def parse_size(text: str) -> tuple[int, int]:
    """``N``, ``HxW`` or ``H,W`` as ``(H, W)``; a ValueError saying what is accepted otherwise."""
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise ValueError("use N or HxW, e.g. 224 or 256x192") from None
    size = as_size(parts[0] if len(parts) == 1 else parts)
    if size is None:
        raise ValueError("use N or HxW with positive numbers")
    return size


@contextmanager
def replacing(path: Path):
    """A temporary sibling of ``path`` to write in the block; renamed over ``path`` when the block
    succeeds and removed when it fails, so readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_replacing(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling (see ``replacing``)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def per_channel(values, channels: int) -> tuple[float, ...]:
    """Normalisation statistics (mean or std) for ``channels`` inputs: as given when they match,
    their average for one channel (gray from RGB statistics), else cycled."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[c % len(values)] for c in range(channels))
