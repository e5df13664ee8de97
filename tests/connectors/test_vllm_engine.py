"""The vLLM connector against the real vLLM package (opt-in: ``-m engines``; docs/engines.md).

Run in a virtual environment that has vLLM installed, with this checkout on
``PYTHONPATH``. Uses vLLM's own base class, connector factory,
``KVTransferConfig``, ``Request`` (with vLLM's block hasher, so the keys come
from vLLM's real block hashes), ``SchedulerOutput`` and KV event structs.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

pytestmark = pytest.mark.engines
vllm = pytest.importorskip("vllm")

import msgspec
from vllm.config import KVTransferConfig
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, supports_hma
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request

from kvstore.connectors import vllm_compat
from kvstore.connectors.vllm import KVStoreConnector
from kvstore.connectors.vllm_events import BlockRemoved as OurRemoved
from kvstore.connectors.vllm_events import BlockStored as OurStored
from kvstore.connectors.vllm_events import encode_batch
from tests.connectors.test_vllm_fakes import FakeEngine, make_config

BS, C = 4, 8
_ids = itertools.count()


def real_config(**extra: Any) -> Any:
    cfg = make_config()
    cfg.kv_transfer_config = KVTransferConfig(  # type: ignore[assignment]
        kv_connector="KVStoreConnector",
        kv_connector_module_path="kvstore.connectors.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={"store_id": f"engine-{next(_ids)}", "chunk_tokens": C, "cpu_bytes": 1 << 20,
                                   **extra},
    )
    return cfg


def real_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return Request(rid, tokens, SamplingParams(max_tokens=1), None, cache_salt=salt,
                   block_hasher=get_request_block_hasher(BS, hash_fn))


def real_output(request: Any, block_ids: list[int], computed: int, scheduled: int) -> SchedulerOutput:
    new = NewRequestData(req_id=request.request_id, prompt_token_ids=request.prompt_token_ids, mm_features=[],
                         sampling_params=request.sampling_params, pooling_params=None, block_ids=(block_ids,),
                         num_computed_tokens=computed, lora_request=None)
    return SchedulerOutput(scheduled_new_reqs=[new], scheduled_cached_reqs=CachedRequestData.make_empty(),
                           num_scheduled_tokens={request.request_id: scheduled},
                           total_num_scheduled_tokens=scheduled, scheduled_spec_decode_tokens={},
                           scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])


class RealEngine(FakeEngine):
    make_output = staticmethod(real_output)


def test_real_base_class_and_factory_resolve_the_connector() -> None:
    assert vllm.__version__ == vllm_compat.PINNED_VLLM and vllm_compat.HAVE_VLLM
    assert issubclass(KVStoreConnector, KVConnectorBase_V1)
    cfg = real_config()
    assert KVConnectorFactory.get_connector_class(cfg.kv_transfer_config) is KVStoreConnector
    assert not supports_hma(KVStoreConnector)  # vLLM turns the hybrid KV cache manager off for it


def test_round_trip_with_real_requests_and_scheduler_outputs() -> None:
    cfg = real_config()
    a, b = RealEngine(KVStoreConnector, cfg), RealEngine(KVStoreConnector, cfg)
    try:
        tokens = [(t * 37 + 11) % 32000 for t in range(29)]
        req_a = real_request("a", tokens)
        assert len(req_a.block_hashes) == 7 and all(isinstance(h, bytes) for h in req_a.block_hashes)
        a.run_prefill(req_a)
        req_b = real_request("b", tokens)
        rb = b.run_prefill(req_b, forward=False)
        assert rb.external_tokens == 24 and rb.load_errors == set()
        assert all(b.token_matches(req_b, rb.block_ids, pos) for pos in range(24))
        other_tenant = real_request("c", tokens, salt="someone-else")
        assert b.scheduler.get_num_new_matched_tokens(other_tenant, 0) == (0, False)
    finally:
        a.close()
        b.close()


def test_take_events_are_vllm_structs_and_our_wire_bytes_match_msgspec() -> None:
    cfg = real_config()
    eng = RealEngine(KVStoreConnector, cfg)
    try:
        eng.run_prefill(real_request("a", [(t * 3) % 32000 for t in range(17)]))
        events = list(eng.scheduler.take_events())
        assert [type(e) for e in events] == [BlockStored, BlockStored] and events[0].medium == "cpu"
        assert events[0].block_size == C and len(events[0].block_hashes[0]) == 32
        sched = eng.scheduler.scheduler
        ns = next(iter(sched._namespaces.values()))
        removed = [BlockRemoved(block_hashes=[events[0].block_hashes[0]], medium="cpu")]
        real_batch = KVEventBatch(ts=5.25, events=[*events, *removed])
        wire = msgspec.msgpack.Encoder().encode(real_batch)
        mine = [OurStored(tuple(e.block_hashes), None, (), e.block_size, None, e.medium, None) for e in events]
        mine.append(OurRemoved((events[0].block_hashes[0],), "cpu"))
        assert encode_batch(mine, 5.25) == wire  # byte for byte
        assert encode_batch(mine, 5.25, 2) == msgspec.msgpack.Encoder().encode(
            KVEventBatch(ts=5.25, events=[*events, *removed], data_parallel_rank=2)
        )
        many = [OurRemoved((bytes([i]) * 32,), "disk") for i in range(40)]  # a 16-bit array header
        real_many = [BlockRemoved(block_hashes=[bytes([i]) * 32], medium="disk") for i in range(40)]
        assert encode_batch(many, 1.0) == msgspec.msgpack.Encoder().encode(KVEventBatch(ts=1.0, events=real_many))
        decoded = msgspec.msgpack.Decoder(KVEventBatch).decode(encode_batch(mine, 5.25))
        assert decoded.events == [*events, *removed] and ns.chunk_tokens == C
    finally:
        eng.close()
