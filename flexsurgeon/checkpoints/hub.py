"""``hf-hub:ORG/NAME[@REV]`` checkpoint sources: names, and downloading a checkpoint's two files through the
Hugging Face cache (``pip install 'flexsurgeon[hub]'``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, HubError
from ..surgery.plan import ARCHITECTURE
from ..utils import HUB_PREFIX, clip, first_line
from .names import CONFIG_NAME, WEIGHTS_NAME

_INSTALL = "pip install 'flexsurgeon[hub]'"


def import_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"the Hugging Face Hub needs huggingface_hub: {_INSTALL}") from None
    return huggingface_hub


def split_repo(name: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME@REV`` (or ``ORG/NAME@REV``) -> ``("ORG/NAME", "REV")``; a one-line error
    for anything that is not a repository id."""
    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    parts = repo.split("/")
    if not repo or len(parts) > 2 or not all(parts) or any(c.isspace() for c in repo):
        raise HubError(f"'{name}' is not a Hub repository: expected ORG/NAME (optionally @REVISION)")
    return repo, revision or None


def download_file(name: str, filename: str) -> Path:
    """One file of the repository ``name`` (``[hf-hub:]ORG/NAME[@REV]``), from the local cache or
    the Hub; without network and not cached, a one-line CheckpointError."""
    hub = import_hub()
    repo, revision = split_repo(name)
    try:
        return Path(hub.hf_hub_download(repo, filename, revision=revision))
    except Exception as exc:  # offline, not found, gated, network: all mean "no such file here"
        raise CheckpointError(f"cannot get {filename} of hf-hub:{repo}"
                              f"{'@' + revision if revision else ''}: {clip(first_line(exc), 200)}") from None


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
