"""Crash-safe writes: a folder (or a file) appears under its final name complete, or not at all.

``atomic_dir(target)`` yields an empty staging folder ``.<name>.tmp-*`` next to ``target``. When the
block ends, every file and folder in it is fsynced, it is renamed onto ``target`` and the parent
folder is fsynced. An existing ``target`` is swapped out in the same step (Linux
``renameat2(RENAME_EXCHANGE)``), so a reader sees the old folder or the new one, never a mix and
never neither. Where the OS can't exchange (macOS, some file systems) the old folder is renamed
aside first; a crash between the two renames leaves it at ``.<name>.tmp-*.old``.

An error in the block or while finishing removes the staging folder and leaves ``target`` as it
was; a process killed mid-write leaves at most a hidden ``.<name>.tmp-*`` folder behind.

``atomic_file(target, write)`` does the same for one file: ``write`` fills a temporary file beside it, which is
fsynced and renamed onto ``target``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_INFIX = ".tmp-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in the yielded staging folder; on success it replaces ``target`` in one step.

    ``target`` is resolved first, so a symlink to a folder keeps pointing at the new contents.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}{STAGING_INFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not mkdtemp: its mode 0700 would become the final folder's
    try:
        yield staging
        _fsync_tree(staging)
        _move_into_place(staging, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange it holds the old folder


def atomic_file(target: str | os.PathLike, write) -> None:
    """Call ``write(temp_path)`` on a temporary file beside ``target``, fsync it, then move it onto ``target``."""
    target = Path(target)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise


def _move_into_place(staging: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif not _exchange(staging, target):
        backup = staging.with_name(staging.name + ".old")
        os.rename(target, backup)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the OS or the file system can't."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, or musl
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(Path(folder, name))
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows can't open a folder to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
