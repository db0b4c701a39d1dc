"""Files of a Hugging Face Hub repository (``hf-hub:ORG/NAME[@REV]``), read through
huggingface_hub's cache (``pip install 'flexsurgeon[hub]'``).

Where the Hub cannot be reached, files come from the cache at once: the hub client would
otherwise retry for most of a minute, printing every try, before it looked there.
"""
from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import HubError
from .utils import HUB_PREFIX, clip, first_line

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


def hub_host() -> str:
    """The Hub's host name (``HF_ENDPOINT`` can name a mirror)."""
    import_hub()  # the install hint, where huggingface_hub is missing
    from huggingface_hub import constants  # a submodule: not loaded by ``import huggingface_hub``

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def hub_reachable() -> bool:
    """Whether the Hub's host name resolves: without it no request can succeed."""
    try:
        socket.getaddrinfo(hub_host(), 443)
    except OSError:
        return False
    return True


def download_file(name: str, filename: str) -> Path:
    """The cached copy of ``filename`` in the repository ``name``: downloaded when the Hub can
    be reached, else the one an earlier download left in the cache."""
    hub = import_hub()
    repo, revision = split_repo(name)
    where = f"{filename} of {HUB_PREFIX}{repo}{'@' + revision if revision else ''}"
    offline = not hub_reachable()
    try:
        return Path(hub.hf_hub_download(repo, filename, revision=revision, local_files_only=offline))
    except Exception as exc:  # offline, not found, gated, network: all mean "no such file here"
        if offline:
            raise HubError(f"cannot get {where}: no network ({hub_host()} cannot be reached) and it is not in "
                           "the Hugging Face cache") from None
        raise HubError(f"cannot get {where}: {clip(first_line(exc), 200)}") from None
