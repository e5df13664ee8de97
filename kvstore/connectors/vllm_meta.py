"""What the scheduler-side connector tells the worker-side one each step.

Specs carry vLLM's block hashes, not kvstore keys: each worker turns them
into keys under its own namespace (its own tensor/pipeline shard), so one
scheduler plan serves every shard. Only plain values (str, int, bytes and
tuples of them) are held, so vLLM can ship the metadata to worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.connectors.vllm_compat import KVConnectorMetadata
from kvstore.keys import EngineHash


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Read stored chunks into a request's blocks, for tokens ``[start_token, end_token)``.

    Invariants: ``block_hashes`` covers whole chunks ``first_chunk ..``, the
    last of which ends at ``end_token``; ``start_token`` is block-aligned and
    inside the first chunk; ``block_ids[i]`` holds block ``start_token // B + i``;
    ``leases`` holds ``(tp_rank, pp_rank, lease)`` of each shard the lookup
    pinned (each worker uses and releases its own); ``is_async`` loads run in
    the background and are reported through ``get_finished``.
    """

    req_id: str
    tenant: str
    block_hashes: tuple[EngineHash, ...]
    first_chunk: int
    start_token: int
    end_token: int
    block_ids: tuple[int, ...]
    leases: tuple[tuple[int, int, int | None], ...] = ()
    is_async: bool = False

    def lease_of(self, tp_rank: int, pp_rank: int) -> int | None:
        """The lease the lookup took in the namespace of shard ``(tp_rank, pp_rank)``, or None."""
        for tp, pp, lease in self.leases:
            if (tp, pp) == (tp_rank, pp_rank):
                return lease
        return None


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Store whole chunks ``first_chunk ..`` of a request, read from ``block_ids`` (one per block)."""

    req_id: str
    tenant: str
    block_hashes: tuple[EngineHash, ...]
    first_chunk: int
    block_ids: tuple[int, ...]


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """One step's loads (done before the forward pass) and saves (after it)."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
