"""What a transfer reports while it runs: chunks and bytes done, codec per chunk, estimate, state.

A :class:`TransferProgress` is written by its transfer's task only (on the
event loop) and read by the admin API; ``done`` is the set of keys the peer
acknowledged (or already held), which is what a resumed transfer skips.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvstore.keys import ChunkKey


class TransferState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED})


@dataclass(slots=True)
class ChunkSent:
    """One chunk's record: which codec carried it and how many bytes went over the link."""

    key: ChunkKey
    codec: str
    raw_bytes: int
    sent_bytes: int


@dataclass(slots=True)
class TransferProgress:
    """The live record of one transfer (see the module docstring).

    Invariants: ``chunks_done + chunks_skipped + chunks_missing <= chunks_total``;
    ``done`` holds exactly the keys counted in ``chunks_done`` and ``chunks_skipped``.
    """

    id: str
    direction: str
    peer: str
    namespace: str
    tenant: str
    codec_policy: str
    chunks_total: int
    deadline_s: float | None = None
    state: TransferState = TransferState.PENDING
    chunks_done: int = 0
    chunks_skipped: int = 0
    chunks_missing: int = 0
    bytes_raw: int = 0
    bytes_sent: int = 0
    resent: int = 0
    reconnects: int = 0
    relost: int = 0  # chunks acknowledged earlier that the peer had lost when the transfer resumed
    estimate_bytes_per_s: float | None = None
    projected_s: float | None = None
    deadline_met: bool | None = None
    recompute_cheaper: bool = False
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    chunks: list[ChunkSent] = field(default_factory=list)
    done: set[ChunkKey] = field(default_factory=set)
    missing: set[ChunkKey] = field(default_factory=set)

    def sent(self, record: ChunkSent) -> None:
        if record.key in self.done:
            return
        self.done.add(record.key)
        self.chunks.append(record)
        self.chunks_done += 1
        self.bytes_raw += record.raw_bytes
        self.bytes_sent += record.sent_bytes

    def skipped(self, key: ChunkKey) -> None:
        if key not in self.done:
            self.done.add(key)
            self.chunks_skipped += 1

    def lost(self, key: ChunkKey) -> None:
        """A key counted done that the peer no longer holds (it restarted, evicted): to send again."""
        if key not in self.done:
            return
        self.done.discard(key)
        self.relost += 1
        for i, record in enumerate(self.chunks):
            if record.key == key:
                del self.chunks[i]
                self.chunks_done -= 1
                self.bytes_raw -= record.raw_bytes
                self.bytes_sent -= record.sent_bytes
                return
        self.chunks_skipped -= 1

    def absent(self, key: ChunkKey) -> None:
        if key not in self.missing:
            self.missing.add(key)
            self.chunks_missing += 1

    def finish(self, state: TransferState, error: str | None = None) -> None:
        self.state, self.error, self.finished_at = state, error, time.time()
        if self.deadline_s is not None and state is TransferState.DONE:
            self.deadline_met = self.finished_at - self.started_at <= self.deadline_s

    @property
    def elapsed_s(self) -> float:
        return (self.finished_at or time.time()) - self.started_at

    def codec_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.chunks:
            counts[c.codec] = counts.get(c.codec, 0) + 1
        return counts

    def to_json(self, with_chunks: bool = True) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id, "direction": self.direction, "peer": self.peer, "namespace": self.namespace,
            "state": self.state.value, "codec_policy": self.codec_policy, "chunks_total": self.chunks_total,
            "chunks_done": self.chunks_done, "chunks_skipped": self.chunks_skipped,
            "chunks_missing": self.chunks_missing, "bytes_raw": self.bytes_raw, "bytes_sent": self.bytes_sent,
            "resent": self.resent, "reconnects": self.reconnects, "relost": self.relost, "estimate_bytes_per_s": self.estimate_bytes_per_s,
            "projected_s": self.projected_s, "deadline_s": self.deadline_s, "deadline_met": self.deadline_met,
            "recompute_cheaper": self.recompute_cheaper, "error": self.error, "elapsed_s": round(self.elapsed_s, 6),
            "codecs": self.codec_counts(),
        }  # fmt: skip
        if with_chunks:
            out["chunks"] = [
                {"key": c.key.hex(), "codec": c.codec, "raw_bytes": c.raw_bytes, "sent_bytes": c.sent_bytes}
                for c in self.chunks
            ]
        return out
