"""Crash-safe folder writes: a folder is written in a temporary sibling, then swapped into place.

A kill at any moment leaves the destination either as it was or complete and new. Used for
every folder flexsurgeon writes (checkpoints, exports). Recovery from a save killed in the
middle of the two-rename fallback happens on the next save, or through ``recover``.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
import uuid
from pathlib import Path

from safetensors import SafetensorError

from ..errors import CheckpointError
from ..utils import first_line


def write_folder(directory: Path, write, force: bool) -> Path:
    """Write a folder through ``write(tmp)`` into a temporary sibling, then swap it into place.

    A kill at any moment leaves DIR either as it was or complete and new: an existing DIR is
    exchanged with the new folder in one ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere it
    is renamed aside first, and the next save (or ``finetune --resume``) puts that copy back if
    the kill fell between the two renames. Leftovers of killed saves are removed by the next save.
    A failure is one CheckpointError naming ``directory``, never the temporary folder.
    """

    directory = Path(directory)
    recover(directory)
    existed = directory.exists()
    if existed and not force:
        raise CheckpointError(f"output folder {directory} already exists; pass --force to replace it")
    if existed and not directory.is_dir():
        raise CheckpointError(f"output path {directory} exists and is not a folder")
    tmp = directory.parent / f".{directory.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if existed:
            _replace_dir(tmp, directory)  # tmp now holds the previous folder (or nothing)
        else:
            _rename(tmp, directory)
        _fsync_dir(directory.parent)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or first_line(exc)
        kept = "; the previous checkpoint there is unchanged" if existed and directory.is_dir() else ""
        raise CheckpointError(f"could not write {directory}: {reason}{kept}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_rename = os.rename  # module-level so fault tests can stop a save between steps


def _replace_dir(new: Path, directory: Path) -> None:
    """Put ``new`` at ``directory`` (which exists); afterwards ``new`` holds the old folder or is gone."""
    if _exchange(new, directory):
        return
    old = directory.parent / f".{directory.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _rename(directory, old)
    try:
        _rename(new, directory)  # a kill just before this leaves only `old`: recover puts it back
    except OSError:
        _rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""

    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _fsync_tree(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):  # a push's plots/
            _fsync_tree(Path(entry.path))
            continue
        with open(entry.path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the files themselves are synced
    finally:
        os.close(fd)


def _leftovers(directory: Path) -> list[tuple[Path, bool]]:
    """Temporary siblings of ``directory`` left by saves whose process is gone: (path, is_old_copy)."""
    found = []
    try:
        entries = list(directory.parent.iterdir())
    except OSError:
        return found
    for path in entries:
        for tag, is_old in ((_TMP_TAG, False), (_OLD_TAG, True)):
            prefix = f".{directory.name}{tag}"
            if path.name.startswith(prefix) and not _pid_alive(path.name[len(prefix):].partition("-")[0]):
                found.append((path, is_old))
    return found


def _pid_alive(text: str) -> bool:
    if not text.isdigit() or int(text) <= 0:
        return False  # older names carry no process id
    if int(text) == os.getpid():
        return True
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: leave its files alone
    return True


def recover(directory) -> None:
    """Make ``directory`` ready for a writer after killed saves: put the previous folder back if a
    save was killed between its two renames, and delete the unfinished temporary folders and
    replaced copies that killed saves left. Readers never call this; a writer (the next save,
    ``finetune --resume``) does."""
    directory = Path(directory)
    leftovers = _leftovers(directory)
    old = interrupted_save(directory)
    if old is not None:
        try:
            _rename(old, directory)
        except OSError as exc:
            raise CheckpointError(_missing_message(directory, old) + f" ({exc.strerror or exc})") from exc
        leftovers = [(p, is_old) for p, is_old in leftovers if p != old]
    for path, _ in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def interrupted_save(directory: Path) -> Path | None:
    """The previous copy of ``directory`` when a save was killed between its two renames (so that
    ``directory`` itself is missing), else None."""
    if directory.exists():
        return None
    olds = [p for p, is_old in _leftovers(directory) if is_old and p.is_dir()]
    return max(olds, key=lambda p: p.stat().st_mtime) if olds else None


def _missing_message(directory: Path, old: Path) -> str:
    return (f"{directory} is missing because a save was interrupted; the previous checkpoint is in {old}: "
            f"rename it to {directory.name}")


def check_not_interrupted(directory) -> None:
    """For readers: one clear line, instead of 'not found', where a killed save left ``directory``
    renamed aside. Nothing is renamed here: loading leaves the files as they are."""
    directory = Path(directory)
    old = interrupted_save(directory)
    if old is not None:
        raise CheckpointError(_missing_message(directory, old) + " (or save there again)")


__all__ = ["check_not_interrupted", "interrupted_save", "recover", "write_folder"]
