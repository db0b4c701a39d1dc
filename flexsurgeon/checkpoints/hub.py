"""``hf-hub:ORG/NAME[@REV]`` checkpoint sources: whether a repository holds a converted model, and
its two files through the Hugging Face cache (``..hub`` reads them).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..hub import download_file
from ..surgery.plan import ARCHITECTURE
from ..utils import CONFIG_NAME, WEIGHTS_NAME, clip, first_line


def holds_converted_model(name: str) -> bool:
    """Whether the repository ``name`` holds a converted model (its config.json names our timm
    architecture) rather than a timm model to convert."""
    try:
        config = json.loads(download_file(name, CONFIG_NAME).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{name}: config.json is not JSON ({clip(first_line(exc), 120)})") from None
    return isinstance(config, dict) and config.get("architecture") == ARCHITECTURE


def download_checkpoint(name: str) -> Path:
    """The cached folder holding config.json and model.safetensors of the repository ``name``."""
    config = download_file(name, CONFIG_NAME)
    weights = download_file(name, WEIGHTS_NAME)
    if config.parent != weights.parent:  # both come from one snapshot of the repository
        raise CheckpointError(f"{name}: config.json and model.safetensors came from different revisions")
    return config.parent
