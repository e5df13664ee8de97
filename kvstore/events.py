"""Store events, in the shape of vLLM's KV events (BlockStored, BlockRemoved,
AllBlocksCleared), with the tier as the medium.

An event is emitted only once the chunk can really be fetched (stored) or
can no longer be (removed). Sinks are injected; the store never keeps a
global queue.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Literal, Protocol

from kvstore.keys import ChunkKey, NamespaceId

EventKind = Literal["stored", "removed", "cleared"]


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """``stored``/``removed`` name one key in one tier; ``cleared`` names a namespace (or all)."""

    kind: EventKind
    tier: str
    namespace: NamespaceId | None
    key: ChunkKey | None = None


class EventSink(Protocol):
    def emit(self, event: StoreEvent) -> None: ...


class EventQueue:
    """A bounded, thread-safe event buffer; the oldest events are dropped (and counted) when full."""

    def __init__(self, maxlen: int = 65536) -> None:
        self._events: collections.deque[StoreEvent] = collections.deque()
        self._maxlen = maxlen
        self._lock = threading.Lock()
        self.dropped = 0

    def emit(self, event: StoreEvent) -> None:
        with self._lock:
            if len(self._events) >= self._maxlen:
                self._events.popleft()
                self.dropped += 1
            self._events.append(event)

    def drain(self) -> list[StoreEvent]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
            return out
