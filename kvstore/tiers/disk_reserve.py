"""Room kept on the disk tier's file system so that a full disk can still be cleared.

LMDB is copy-on-write: deleting a record writes new B-tree pages, and when
its file has no free pages left and the file system is full (ENOSPC), even a
deletion cannot commit, so neither eviction nor DELETE nor CLEAR could ever
make room again from inside the process. The disk tier therefore keeps a
small file of really allocated blocks (``reserve`` in its directory). When a
deletion fails because the file system is full, the reserve is removed and
the deletion retried: it now has blocks to grow into, and the pages it frees
are reused by later writes inside LMDB's file. The reserve is made again, at
most every ``RETRY_S`` seconds, once the file system has room for it.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RESERVE_NAME = "reserve"
RETRY_S = 5.0
MIN_BYTES, MAX_BYTES = 256 << 10, 4 << 20


def reserve_size(capacity_bytes: int) -> int:
    """Default size of the reserve: 1/64 of the budget, within 256 KiB .. 4 MiB.

    A deletion copies a few B-tree pages per key (payloads over a page are
    freed without being copied), so 256 KiB commits the deletion of thousands
    of records.
    """
    return max(MIN_BYTES, min(MAX_BYTES, capacity_bytes // 64))


class DiskReserve:
    """A file of ``nbytes`` allocated blocks, given back to the file system when a deletion needs them.

    Not thread-safe: the disk tier calls it with its write lock held.
    """

    def __init__(self, directory: str, nbytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.path.join(directory, RESERVE_NAME)
        self.nbytes = nbytes
        self._clock = clock
        self._next_try = 0.0
        self.released = 0  # times the reserve was given back to let a deletion commit
        self.held = os.path.exists(self.path) and os.path.getsize(self.path) >= nbytes

    def ensure(self) -> bool:
        """Make the reserve if it is missing and the last try is old enough; whether it is held."""
        if self.held or self.nbytes <= 0 or self._clock() < self._next_try:
            return self.held
        self._next_try = self._clock() + RETRY_S
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            finally:
                os.close(fd)
            self.held = True
        except OSError as exc:
            self._drop()
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("disk reserve %s: cannot allocate %d bytes: %s", self.path, self.nbytes, exc)
        return self.held

    def release(self) -> bool:
        """Give the reserve's blocks back to the file system; whether there was one to give."""
        if not self.held:
            return False
        self._drop()
        self.released += 1
        self._next_try = self._clock() + RETRY_S
        log.warning(
            "disk reserve %s: released %d bytes so that a deletion can commit", self.path, self.nbytes
        )
        return True

    def _drop(self) -> None:
        self.held = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
