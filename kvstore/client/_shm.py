"""The client's mapping of the daemon's shared-memory arena (same host, same uid).

The daemon keeps its CPU tier in one file under /dev/shm (mode 0600); a
client of the same user maps it once, shared and writable. A get copies a
pinned chunk from the mapping into the caller's buffer (the one copy); a put
copies the caller's bytes into a reserved extent while hashing them, and the
daemon verifies the hash before it commits.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading

import numpy as np
import xxhash

from kvstore.buffers import U8
from kvstore.checksum import BLOCK, copy_with_checksum
from kvstore.errors import InvalidInput, RemoteUnavailable


class ShmArena:
    """A shared, writable mapping of the daemon's arena file.

    Invariant: reads and writes stay inside extents the daemon handed out
    (pinned for reads, reserved for writes); bounds are checked against the
    mapping's size before every copy.
    """

    def __init__(self, path: str, size: int, populate: bool = False) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise RemoteUnavailable(f"cannot open the daemon's shared arena {path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or not path.startswith("/dev/shm/"):
                raise RemoteUnavailable(f"{path} is not a shared-memory file of this user; not mapping it")
            if st.st_size < size:
                raise RemoteUnavailable(f"shared arena {path} is smaller than the daemon said ({size} bytes)")
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path = path
        self.size = size
        self.buf: U8 = np.frombuffer(self._map, dtype=np.uint8)
        self.closed = False

    def _span(self, offset: int, n: int) -> U8:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise InvalidInput(f"extent [{offset}, {offset + n}) outside the shared arena of {self.size} bytes")
        return self.buf[offset : offset + n]

    def copy_out(self, offset: int, n: int, out: U8) -> None:
        """Copy ``n`` bytes at ``offset`` into the start of ``out``."""
        np.copyto(out[:n], self._span(offset, n))

    def view(self, offset: int, n: int) -> U8:
        return self._span(offset, n)

    def copy_in(self, offset: int, src: U8) -> bytes:
        """Copy ``src`` to ``offset`` and return the XXH3-128 of what was written."""
        return copy_with_checksum(src, self._span(offset, src.size))

    def copier(self, offset: int, src: U8) -> StreamCopy:
        """A copy of ``src`` to ``offset`` done in steps (the daemon hashes each step meanwhile)."""
        return StreamCopy(src, self._span(offset, src.size))

    def close(self) -> None:
        """Let go of the mapping: it is unmapped as soon as no copy in progress uses it (reference counting)."""
        self.closed = True


class StreamCopy:
    """Copies ``src`` into ``dst`` a step at a time, hashing each block right after copying it."""

    def __init__(self, src: U8, dst: U8) -> None:
        self._src, self._dst = src, dst
        self._hash = xxhash.xxh3_128()
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= self._src.size

    def advance(self, nbytes: int) -> int:
        """Copy up to ``nbytes`` more; returns how many bytes are copied in all."""
        end = min(self._src.size, self.pos + nbytes)
        for off in range(self.pos, end, BLOCK):
            stop = min(off + BLOCK, end)
            dst = self._dst[off:stop]
            np.copyto(dst, self._src[off:stop])
            self._hash.update(dst.data)
        self.pos = end
        return end

    def digest(self) -> bytes:
        return self._hash.digest()


class ArenaCache:
    """The mapping of the daemon's arena, shared by a client's connections; thread-safe.

    A daemon that restarted has a new arena file: the old mapping is dropped
    (unmapped once no copy uses it), so a client never pins a dead daemon's memory.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arena: ShmArena | None = None

    def get(self, path: str, size: int) -> ShmArena:
        with self._lock:
            arena = self._arena
            if arena is None or arena.path != path or arena.size != size:
                if arena is not None:
                    arena.close()
                arena = self._arena = ShmArena(path, size)
            return arena

    def close(self) -> None:
        with self._lock:
            arena, self._arena = self._arena, None
        if arena is not None:
            arena.close()
