"""A transfer's progress record: what a resumed transfer counts when the peer lost acknowledged chunks."""

from __future__ import annotations

from kvstore.keys import ChunkKey
from kvstore.service.migration.progress import ChunkSent, TransferProgress

K = [ChunkKey(bytes([i]) * 32) for i in range(3)]


def test_lost_chunks_leave_done_and_their_bytes() -> None:
    p = TransferProgress("t", "push", "peer", "ns", "tenant", "raw", chunks_total=3)
    p.sent(ChunkSent(K[0], "raw", 100, 100))
    p.sent(ChunkSent(K[1], "int8", 100, 50))
    p.skipped(K[2])
    p.lost(K[1])  # sent, then lost by the peer
    p.lost(K[2])  # skipped (the peer held it), then lost
    p.lost(K[2])  # twice: counted once
    assert p.done == {K[0]}
    assert (p.chunks_done, p.chunks_skipped, p.relost) == (1, 0, 2)
    assert (p.bytes_raw, p.bytes_sent) == (100, 100)
    assert [c.key for c in p.chunks] == [K[0]]
    p.sent(ChunkSent(K[1], "raw", 100, 100))  # sent again
    assert p.chunks_done == 2 and p.to_json()["relost"] == 2
