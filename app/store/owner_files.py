"""Liveness locks for processes sharing one SQLite file: an OS file lock per owner.

Each process holds an exclusive ``flock`` on ``<database>-owners/<owner>.lock`` for as long as
its store is open. The kernel drops that lock the moment the process dies, however it dies
(``kill -9`` included), so another process can tell a dead owner from a slow one at once by
trying to take the lock. SQLite already requires every process on a file to share one machine,
so these locks cover every process that can hold a lease. The folder is found from the
database's real path, so processes reaching one file through different links share it.

Only a lock file that exists and that anyone can lock proves its owner dead; a missing or
unreadable one proves nothing, and that owner's leases simply run their course. So a file
stays after its owner is gone, and is removed only once that owner holds no live lease. A lock
file appears under its final name only already locked (it is created and locked under a
temporary name, then renamed), and a process whose own file was removed from under it makes
it again.
"""

import contextlib
import fcntl
import logging
import os
import uuid
from collections.abc import Collection
from pathlib import Path
from urllib.parse import quote, unquote

logger = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".new-"


def owners_directory(database: Path) -> Path:
    """Where the lock files of a database's owners live: beside its real file."""
    real = Path(os.path.realpath(database))
    return real.with_name(real.name + "-owners")


class OwnerFileLocks:
    """The lock files of one database's owners, and the one this process holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: int | None = None
        self._owner: str | None = None
        self._warned: set[str] = set()

    def path(self, owner: str) -> Path:
        """The lock file of ``owner`` (any owner id maps to one safe file name)."""
        return self.directory / (quote(owner, safe="") + ".lock")

    def hold(self, owner: str) -> None:
        """Take ``owner``'s lock, to keep until ``let_go``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._owner = owner
        self._held = self._create_locked(self.path(owner))

    def keep_held(self) -> None:
        """Make the lock file again if it was removed or replaced from under this process."""
        if self._held is None or self._owner is None:
            return
        path = self.path(self._owner)
        try:
            if os.stat(path).st_ino == os.fstat(self._held).st_ino:
                return
        except FileNotFoundError:
            pass
        logger.warning("the lock file %s was removed; making it again", path)
        self.directory.mkdir(parents=True, exist_ok=True)
        replaced, self._held = self._held, self._create_locked(path)
        os.close(replaced)

    def _create_locked(self, final: Path) -> int:
        while True:
            temporary = self.directory / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
            descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                os.rename(temporary, final)
            except FileNotFoundError:  # another process removed it as unlocked; try again
                os.close(descriptor)
                continue
            return descriptor

    def let_go(self) -> None:
        """Release this process's lock; its file stays.

        Unlocked, the file says this owner is gone (whatever it left is taken at once), until
        a sweep or the next start removes it.
        """
        if self._held is not None:
            os.close(self._held)
        self._held = self._owner = None

    def is_dead(self, owner: str) -> bool:
        """Whether ``owner``'s lock file exists and nobody holds it.

        A file that is missing or cannot be opened says nothing: False.
        """
        try:
            return _is_free(self.path(owner))
        except OSError as error:
            if str(error) not in self._warned:  # once per kind of trouble, not every sweep
                self._warned.add(str(error))
                logger.warning("cannot check whether %s is alive: %s", owner, error)
            return False

    def remove_gone(self, holding_leases: Collection[str]) -> None:
        """Remove the lock files of gone owners that hold no live lease (nothing to prove)."""
        for path in self.directory.iterdir():
            owner = unquote(path.name.removesuffix(".lock"))
            if owner == self._owner or owner in holding_leases:
                continue
            with contextlib.suppress(OSError):
                if _is_free(path, remove=True):
                    logger.info("removed the lock file of a process that is gone: %s", path.name)


def _is_free(path: Path, *, remove: bool = False) -> bool:
    """Whether ``path`` exists and nobody holds its lock (and, if asked, remove it then)."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return True
    finally:
        os.close(descriptor)
