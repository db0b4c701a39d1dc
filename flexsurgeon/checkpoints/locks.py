"""One writer per folder: ``hold(DIR)`` makes a second flexsurgeon process that wants to write
DIR (``finetune``, ``convert -o``, ``ablate``) stop with one line naming the holder.

The lock is ``flock`` on a sibling file ``.NAME.lock`` that holds the holder's process id. The
kernel drops it when the holder exits, even by SIGKILL, so a dead holder keeps nothing. Where
``fcntl`` is missing (Windows) folders are not locked.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

_held: set[Path] = set()  # folders this process holds: holding one again inside is a no-op


@contextlib.contextmanager
def hold(directory):
    """Hold ``directory`` for writing for the duration of the block. Under torchrun only rank 0
    holds it: the ranks of one run share its folder."""
    directory = Path(directory).absolute()
    if fcntl is None or directory in _held or os.environ.get("RANK", "0") != "0":
        yield
        return
    fd = _lock(directory)
    _held.add(directory)
    try:
        yield
    finally:
        _held.discard(directory)
        with contextlib.suppress(OSError):
            os.unlink(_lock_path(directory))  # while still locked, so no one locks a file about to vanish
        os.close(fd)


def _lock_path(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.lock"


def _lock(directory: Path) -> int:
    path = _lock_path(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise CheckpointError(f"{directory} is in use by {who} (another flexsurgeon run writing there); "
                                      "wait for it to end or choose another output folder") from None
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:  # else the holder we waited on removed this file as it let go: lock the new one
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"could not write {directory}: {exc.strerror or exc}") from None


__all__ = ["hold"]
