"""Liveness locks for processes sharing one SQLite file: an OS file lock per owner.

Each process holds an exclusive ``flock`` on ``<database>-owners/<owner>.lock`` for as long as
its store is open. The kernel drops that lock the moment the process dies, however it dies
(``kill -9`` included), so another process can tell a dead owner from a slow one at once by
trying to take the lock: if it can, nobody holds it. SQLite already requires every process on a
file to share one machine, so these locks cover every process that can hold a lease.

A lock file appears under its final name only already locked (it is created and locked under a
temporary name, then renamed), so a lock file that can be locked by anyone else is one whose
owner is gone, and the process that finds it so removes it.
"""

import contextlib
import fcntl
import logging
import os
import uuid
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".new-"


class OwnerFileLocks:
    """The lock files of one database's owners, and the one this process holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: int | None = None
        self._held_path: Path | None = None

    def path(self, owner: str) -> Path:
        """The lock file of ``owner`` (any owner id maps to one safe file name)."""
        return self.directory / (quote(owner, safe="") + ".lock")

    def hold(self, owner: str) -> None:
        """Take ``owner``'s lock, to keep until ``let_go``; clear away dead owners' files."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_dead_files()
        final = self.path(owner)
        while True:
            temporary = self.directory / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
            descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                os.rename(temporary, final)
            except FileNotFoundError:  # another process removed it as unlocked; try again
                os.close(descriptor)
                continue
            self._held, self._held_path = descriptor, final
            return

    def let_go(self) -> None:
        """Remove this process's lock file and release its lock."""
        if self._held is None or self._held_path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._held_path)
        os.close(self._held)
        self._held = self._held_path = None

    def is_alive(self, owner: str) -> bool:
        """Whether some process holds ``owner``'s lock; a dead owner's file is removed."""
        return not _take_if_free(self.path(owner))

    def _remove_dead_files(self) -> None:
        for path in self.directory.iterdir():
            if _take_if_free(path):
                logger.info("removed the lock file of a process that is gone: %s", path.name)


def _take_if_free(path: Path) -> bool:
    """Lock ``path`` if nobody holds it and remove it; say whether it was free (or missing)."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(descriptor)
