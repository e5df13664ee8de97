"""HFConnector's other paths on the real model: the disk tier, a lossy codec, misses, errors, bad namespaces.

- disk tier (raw codec) under a CPU tier of one chunk: the KV really comes
  from disk and greedy replies equal those without kvstore;
- a lossy codec (quant int8) on the disk tier: quality against the model's
  own KV is reported and held to a loose bound;
- a chunk evicted between lookup and get: the prompt is computed from that
  chunk on, the logits equal a fresh prefill's, and the lost chunks are
  stored again;
- a backend that fails: the request is computed in full and the lease is
  given back; a slow or failing store never reaches the request;
- a namespace that does not describe the model is refused with every difference named;
- decode-phase KV is within float rounding of a fresh prefill's KV (why it is stored as is).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvstore.buffers import BufferLike
from kvstore.builder import TiersConfig, build_store
from kvstore.connectors.hf import HFConnector, HFConnectorConfig
from kvstore.connectors.hf_backend import PrefixHit, StoreBackend
from kvstore.connectors.hf_chat import replay_chat, user_messages
from kvstore.connectors.hf_spec import NamespaceMismatch
from kvstore.connectors.hf_writer import ChunkWriter, StoreJob
from kvstore.errors import InvalidInput, RemoteUnavailable
from kvstore.keys import ChunkKey, Namespace, prefix_keys
from kvstore.models import LoadedModel, cache_to_chunk
from kvstore.models.prompts import chat_token_ids
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.store import TieredStore
from kvstore.tiers.store_types import StoreConfig
from kvstore.tiers.tier_codecs import CodecChoice
from tests.connectors.test_hf import (
    conversations,
    float32_namespace,
    idle,
    plain_greedy,
    reference_mismatches,
)
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

CHUNK = 16
END = 2  # <|im_end|>


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return require_model()


@pytest.fixture
def store() -> Iterator[TieredStore]:
    with build_store(TiersConfig(cpu_bytes=64 << 20)) as s:
        yield s


def disk_store(path: Path, ns: Namespace, codec: CodecChoice | None = None) -> TieredStore:
    """A CPU tier that holds one chunk above a disk tier; reads are not promoted, so hits come from disk."""
    codecs = {"disk": codec} if codec is not None else {}
    tiers = TiersConfig(cpu_bytes=ns.chunk_nbytes + 4096, data_dir=str(path), disk_bytes=64 << 20, codecs=codecs)
    return build_store(tiers, StoreConfig(promote_on_hit=False, codecs=codecs))


def prompt_ids(lm: LoadedModel, seed: int, tokens: int) -> list[int]:
    """The first ``tokens`` tokens of a real ShareGPT chat (rendered in ChatML) long enough to have them."""
    for conversation in conversations(40, seed=seed, turns=1):
        ids = chat_token_ids(lm.tokenizer, conversation.turns)
        if len(ids) >= tokens:
            return ids[:tokens]
    raise AssertionError(f"no chat of {tokens} tokens among 40")


def fresh_logits(lm: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([list(ids)]), logits_to_keep=1).logits[0, -1]


# -- tiers and codecs ----------------------------------------------------------------------
def test_disk_tier_serves_the_kv_and_replies_match(lm: LoadedModel, tmp_path: Path) -> None:
    ns = float32_namespace(lm, "hf-disk", CHUNK)
    with disk_store(tmp_path / "disk", ns) as store, HFConnector(lm, store, ns) as connector:
        replays = [
            replay_chat(connector, lm.tokenizer, user_messages(c, 2), max_new_tokens=6, max_user_tokens=24)
            for c in conversations(3, seed=5, turns=2)
        ]
        disk = store.stats().tiers[1]
        assert [reference_mismatches(lm, r) for r in replays] == [[], [], []]
        for r in replays:  # every full chunk of turn 1's prompt + reply is reused
            assert r.turns[1].hit_tokens == (r.turns[0].prompt_tokens + len(r.turns[0].reply) - 1) // CHUNK * CHUNK
        assert sum(r.turns[1].hit_tokens for r in replays) >= 4 * CHUNK
        assert disk.name == "disk" and disk.hits >= sum(r.turns[1].hit_tokens // CHUNK for r in replays) - 3
        idle(store)


#: codec params -> loose bounds on (mean KL, top-1 agreement, mean greedy match of 6 tokens)
LOSSY = {
    "int8": ({"bits": 8}, (0.05, 0.75, 3.0)),
    "int4-kivi": ({"bits": 4, "group": "kivi"}, (0.1, 0.5, 2.0)),
}


@pytest.mark.parametrize("name", list(LOSSY))
def test_lossy_codec_quality_is_reported_and_bounded(lm: LoadedModel, tmp_path: Path, name: str,
                                                     record_property: pytest.RecordProperty) -> None:
    params, (max_kl, min_top1, min_match) = LOSSY[name]
    ns = float32_namespace(lm, f"hf-quant-{name}", 32)
    kls, agree, matches, diffs = [], [], [], []
    with disk_store(tmp_path / "disk", ns, CodecChoice("quant", params)) as store, \
            HFConnector(lm, store, ns) as connector:
        for seed in range(4):
            ids = prompt_ids(lm, seed=100 + seed, tokens=96)
            connector.prefill(ids)  # computes and stores the prompt's chunks
            connector.flush()
            cached = connector.prefill(ids)  # every chunk back from the quantized disk tier
            assert cached.hit_tokens == len(ids) - 1 and "disk" in cached.tiers
            ref = fresh_logits(lm, ids)
            p, q = torch.log_softmax(ref, -1), torch.log_softmax(cached.logits, -1)
            kls.append(float((p.exp() * (p - q)).sum()))
            agree.append(int(ref.argmax() == cached.logits.argmax()))
            diffs.append(float((ref - cached.logits).abs().max()))
            ours = connector.generate(ids, 6, eos_token_ids=[END]).tokens
            theirs = plain_greedy(lm, ids, 6, END)
            matches.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours)))
        idle(store)
    report = {"kl_mean": sum(kls) / len(kls), "kl_max": max(kls), "top1_agreement": sum(agree) / len(agree),
              "greedy_match_of_6": sum(matches) / len(matches), "max_logit_diff": max(diffs)}
    for key, value in report.items():
        record_property(key, value)
    print(f"quant {name} on the disk tier vs the model's own KV:", report)
    assert max(diffs) > 0  # the KV really went through the lossy codec
    assert report["kl_mean"] < max_kl and report["top1_agreement"] >= min_top1
    assert report["greedy_match_of_6"] >= min_match


# -- misses and errors ---------------------------------------------------------------------
class EvictingBackend(StoreBackend):
    """Between lookup and get, the lease runs out and chunk ``victim`` is evicted."""

    def __init__(self, store: TieredStore, victim: int) -> None:
        super().__init__(store)
        self.victim = victim

    def get_many(self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike],
                 lease: int | None) -> list[int | None]:
        assert lease is not None
        self.store.release(lease)
        self.store.delete(ns, keys[self.victim])
        return super().get_many(ns, keys, outs, lease)


class FailingBackend(StoreBackend):
    """Reads (or lookups) raise as a dropped connection would."""

    def __init__(self, store: TieredStore, fail_lookup: bool = False) -> None:
        super().__init__(store)
        self.fail_lookup = fail_lookup

    def lookup(self, ns: Namespace, keys: Sequence[ChunkKey], ttl_s: float | None) -> PrefixHit:
        if self.fail_lookup:
            raise RemoteUnavailable("connection dropped")
        return super().lookup(ns, keys, ttl_s)

    def get_many(self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike],
                 lease: int | None) -> list[int | None]:
        raise RemoteUnavailable("connection dropped")


def test_a_chunk_evicted_between_lookup_and_get_is_computed_again(lm: LoadedModel, store: TieredStore) -> None:
    ns = float32_namespace(lm, "hf-evict", CHUNK)
    ids = prompt_ids(lm, seed=7, tokens=80)
    full = len(ids) // CHUNK
    assert full >= 4
    with HFConnector(lm, store, ns) as first:
        first.prefill(ids)
        first.flush()
    with HFConnector(lm, EvictingBackend(store, victim=2), ns) as connector:
        got = connector.prefill(ids + [198])
        stats = connector.stats()
        connector.flush()
    assert got.hit_tokens == 2 * CHUNK  # chunks 0 and 1; chunk 2 is gone, 3.. are never used after the gap
    assert stats.lookup_chunks == full and stats.loaded_chunks == 2 and stats.lost_chunks == full - 2
    ref = fresh_logits(lm, ids + [198])
    assert int(got.logits.argmax()) == int(ref.argmax()) and torch.allclose(got.logits, ref, atol=1e-3)
    idle(store)
    with HFConnector(lm, store, ns) as again:  # what was lost was stored again
        assert again.prefill(ids + [198]).hit_tokens == full * CHUNK


@pytest.mark.parametrize("fail_lookup", [False, True], ids=["get-fails", "lookup-fails"])
def test_a_failing_backend_computes_the_prompt_and_gives_the_lease_back(
    lm: LoadedModel, store: TieredStore, fail_lookup: bool
) -> None:
    ns = float32_namespace(lm, f"hf-fail-{fail_lookup}", CHUNK)
    ids = prompt_ids(lm, seed=8, tokens=40)
    with HFConnector(lm, store, ns) as first:
        first.prefill(ids)
        first.flush()
    with HFConnector(lm, FailingBackend(store, fail_lookup), ns) as connector:
        got = connector.prefill(ids)
        assert got.hit_tokens == 0 and connector.stats().backend_errors == 1
    assert torch.allclose(got.logits, fresh_logits(lm, ids), atol=1e-4)
    assert store.stats().leases.granted == (0 if fail_lookup else 1)
    idle(store)


# -- the background writer -----------------------------------------------------------------
TINY = KVSpec(ModelFingerprint("tiny"), num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32")


class GatedBackend(StoreBackend):
    """Puts wait for ``gate``; with ``fail``, they raise."""

    def __init__(self, store: TieredStore, fail: bool = False) -> None:
        super().__init__(store)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.fail = fail

    def put_many(self, ns: Namespace, keys: Sequence[ChunkKey], chunks: Sequence[BufferLike]) -> list[bool]:
        self.entered.set()
        self.gate.wait(30)
        if self.fail:
            raise RemoteUnavailable("store went away")
        return super().put_many(ns, keys, chunks)


def _job(ns: Namespace, tokens: list[int]) -> StoreJob:
    kv = torch.arange(len(tokens) * 2, dtype=torch.float32).reshape(1, 1, len(tokens), 2)
    return StoreJob(ns, tuple(prefix_keys(ns, tokens)), 0, ((kv, -kv),))


def test_writer_queue_is_bounded_and_a_full_queue_drops_and_counts(store: TieredStore) -> None:
    ns = Namespace("writer", TINY, chunk_tokens=2)
    backend = GatedBackend(store)
    backend.register(ns)
    writer = ChunkWriter(backend, torch.float32, depth=1, timeout_s=0.05)
    try:
        jobs = [_job(ns, [i, i + 1, i + 2, i + 3]) for i in range(0, 40, 10)]
        assert writer.submit(jobs[0])
        assert backend.entered.wait(10)  # the worker holds job 0 at the gate
        assert writer.submit(jobs[1])  # waits in the queue
        assert not writer.submit(jobs[2])  # no room: dropped after 50 ms
        assert writer.stats().dropped_jobs == 1
        backend.gate.set()
        writer.flush()
        stats = writer.stats()
        assert (stats.jobs, stats.stored_chunks, stats.pending) == (2, 4, 0)
        out = torch.empty(TINY.chunk_shape(2))
        assert store.get(ns, jobs[1].keys[1], out) == out.numel() * 4
        assert out[0, 0].flatten().tolist() == [4.0, 5.0, 6.0, 7.0] and out[0, 1].flatten().tolist() == [-4.0, -5.0, -6.0, -7.0]
    finally:
        backend.gate.set()
        writer.close()


def test_a_failing_store_is_counted_and_never_reaches_the_request(lm: LoadedModel, store: TieredStore) -> None:
    ns = float32_namespace(lm, "hf-failing-put", CHUNK)
    backend = GatedBackend(store, fail=True)
    backend.gate.set()
    ids = prompt_ids(lm, seed=9, tokens=40)
    with HFConnector(lm, backend, ns) as connector:
        got = connector.prefill(ids)
        connector.flush()
        assert connector.stats().writer.failed_jobs == 1
    assert torch.allclose(got.logits, fresh_logits(lm, ids), atol=1e-4)


# -- namespaces and input ------------------------------------------------------------------
def test_a_namespace_that_does_not_describe_the_model_is_refused(lm: LoadedModel, store: TieredStore) -> None:
    spec = lm.spec
    wrong = {
        "num_layers": KVSpec(spec.model, 29, spec.num_kv_heads, spec.head_dim),
        "num_kv_heads": KVSpec(spec.model, spec.num_layers, 9, spec.head_dim),
        "model": KVSpec(ModelFingerprint("other/model", "v1"), spec.num_layers, spec.num_kv_heads, spec.head_dim),
        "dtype": lm.spec_for("int8"),
        "layout": KVSpec(spec.model, spec.num_layers, 1, spec.head_dim, layout="mla_latent"),
    }
    for field, bad in wrong.items():
        with pytest.raises(NamespaceMismatch, match=field):
            HFConnector(lm, store, Namespace("t", bad))
    with pytest.raises(NamespaceMismatch, match="scheme"):
        HFConnector(lm, store, Namespace("t", spec, scheme="vllm"))
    with pytest.raises(InvalidInput):  # NamespaceMismatch is an InvalidInput (and a ValueError)
        HFConnector(lm, store, Namespace("t", wrong["num_layers"]))
    assert store.stats().namespaces == 0  # nothing was registered


def test_namespaces_isolate_and_bad_requests_raise(lm: LoadedModel, store: TieredStore) -> None:
    ids = prompt_ids(lm, seed=10, tokens=40)
    with HFConnector(lm, store, float32_namespace(lm, "tenant-a", CHUNK)) as a:
        a.prefill(ids)
        a.flush()
        assert a.prefill(ids).hit_tokens > 0
        with pytest.raises(InvalidInput, match="at least one token"):
            a.prefill([])
        with pytest.raises(InvalidInput, match="vocabulary"):
            a.prefill([1, 2, 10**6])
        with pytest.raises(InvalidInput, match="positions"):
            a.generate(ids, lm.max_positions)
        with pytest.raises(InvalidInput, match="max_new_tokens"):
            a.generate(ids, 0)
        with pytest.raises(InvalidInput, match="temperature"):
            a.generate(ids, 2, greedy=False, temperature=0.0)
    with HFConnector(lm, store, float32_namespace(lm, "tenant-b", CHUNK)) as b:
        assert b.prefill(ids).hit_tokens == 0  # tenant a's chunks never answer tenant b
    with HFConnector(lm, store, Namespace("tenant-a", lm.spec_for("bfloat16"), chunk_tokens=CHUNK)) as c:
        assert c.prefill(ids).hit_tokens == 0  # nor float32 chunks a bfloat16 namespace
    with pytest.raises(InvalidInput):
        HFConnectorConfig(queue_depth=0)


# -- why decode-phase KV is stored as is ---------------------------------------------------
def test_decode_kv_is_within_float_rounding_of_a_fresh_prefill(lm: LoadedModel) -> None:
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids(lm, seed=12, tokens=64)])
    n, split = ids.shape[1], ids.shape[1] - 12
    with torch.inference_mode():
        fresh = DynamicCache(config=lm.model.config)
        lm.model(input_ids=ids, past_key_values=fresh)
        chunked = DynamicCache(config=lm.model.config)
        lm.model(input_ids=ids[:, :split], past_key_values=chunked)
        lm.model(input_ids=ids[:, split:], past_key_values=chunked)
        decoded = DynamicCache(config=lm.model.config)
        lm.model(input_ids=ids[:, :split], past_key_values=decoded)
        for i in range(split, n):
            lm.model(input_ids=ids[:, i : i + 1], past_key_values=decoded)
    ref = cache_to_chunk(fresh)
    scale = float(ref.abs().max())
    decode_err = float((cache_to_chunk(decoded) - ref).abs().max()) / scale
    chunked_err = float((cache_to_chunk(chunked) - ref).abs().max()) / scale
    # both are float32 rounding (relative ~1e-6), far below what any lossy codec changes (int8: ~1e-2)
    assert decode_err < 1e-4 and chunked_err < 1e-4 and math.isfinite(decode_err)
