"""The namespace catalog: registered namespaces survive a restart of a store with a disk tier."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from kvstore.builder import TiersConfig, build_store
from kvstore.errors import CapacityError, UnknownNamespace
from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint, Shard
from kvstore.tiers.namespace_catalog import FILE_NAME, NamespaceCatalog, namespace_from_record, namespace_record


def _ns(tenant: str, chunk_tokens: int = 16, dtype: str = "bfloat16", tp_rank: int = 0) -> Namespace:
    spec = KVSpec(ModelFingerprint("m", "r1"), 2, 2, 8, dtype, "kv_separate", Shard(tp_rank, 2, 0, 1))  # type: ignore[arg-type]
    return Namespace(tenant, spec, chunk_tokens=chunk_tokens)


def test_records_round_trip_every_field() -> None:
    for ns in (_ns("a"), _ns("b", 32, "float16", 1)):
        back = namespace_from_record(msgpack.unpackb(msgpack.packb(namespace_record(ns))))
        assert back == ns and back.id == ns.id


def test_a_record_that_does_not_rebuild_to_its_id_is_rejected() -> None:
    record = namespace_record(_ns("a"))
    record["chunk_tokens"] = 32  # the id names 16-token chunks
    with pytest.raises(Exception, match="does not rebuild"):
        namespace_from_record(record)
    with pytest.raises(Exception, match="malformed"):
        namespace_from_record({"tenant": "a"})


def test_store_with_a_disk_tier_knows_its_namespaces_after_a_restart(tmp_path: Path) -> None:
    config = TiersConfig(cpu_bytes=1 << 20, data_dir=str(tmp_path), disk_bytes=8 << 20)
    ns, other = _ns("a"), _ns("b", 32)
    tokens = np.arange(48, dtype=np.uint32)
    keys = prefix_keys(ns, tokens)
    store = build_store(config)
    try:
        store.register_namespace(ns)
        store.register_namespace(ns)  # idempotent: one record
        store.register_namespace(other)
        for i, key in enumerate(keys):
            store.put(ns, key, np.full(ns.chunk_nbytes, i, np.uint8))
        store.flush()
    finally:
        store.close()
    assert len(NamespaceCatalog(tmp_path).load()) == 2

    store = build_store(config)
    try:
        assert {n.id for n in store.namespaces()} == {ns.id, other.id}
        hit = store.lookup(ns, tokens)  # no register call: the catalog brought it back
        assert hit.hit_tokens == 48
        out = np.empty(ns.chunk_nbytes, np.uint8)
        assert store.get(ns, keys[2], out, hit.lease) == ns.chunk_nbytes and (out == 2).all()
    finally:
        store.close()


def test_a_corrupt_catalog_is_moved_aside_and_the_store_still_starts(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"\xc1not msgpack at all")
    store = build_store(TiersConfig(cpu_bytes=1 << 20, data_dir=str(tmp_path), disk_bytes=8 << 20))
    try:
        assert store.namespaces() == []
        with pytest.raises(UnknownNamespace):
            store.lookup(_ns("a"), np.arange(16, dtype=np.uint32))
        store.register_namespace(_ns("a"))  # a fresh catalog is written
    finally:
        store.close()
    assert (tmp_path / (FILE_NAME + ".corrupt")).read_bytes() == b"\xc1not msgpack at all"
    assert [n.tenant for n in NamespaceCatalog(tmp_path).load()] == ["a"]


def test_a_tampered_record_is_skipped_and_the_others_load(tmp_path: Path) -> None:
    catalog = NamespaceCatalog(tmp_path)
    catalog.record(_ns("a"))
    catalog.record(_ns("b"))
    doc = msgpack.unpackb((tmp_path / FILE_NAME).read_bytes())
    doc["namespaces"][0]["tenant"] = "evil"  # the id no longer matches: never trusted
    (tmp_path / FILE_NAME).write_bytes(msgpack.packb(doc))
    assert [n.tenant for n in NamespaceCatalog(tmp_path).load()] == ["b"]


def test_the_catalog_is_bounded(tmp_path: Path) -> None:
    catalog = NamespaceCatalog(tmp_path, max_entries=2)
    catalog.record(_ns("a"))
    catalog.record(_ns("b"))
    catalog.record(_ns("a"))  # known: accepted
    with pytest.raises(CapacityError, match="at most 2"):
        catalog.record(_ns("c"))
    assert len(NamespaceCatalog(tmp_path).load()) == 2


def test_an_unwritable_catalog_is_logged_and_the_namespace_still_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = build_store(TiersConfig(cpu_bytes=1 << 20, data_dir=str(tmp_path), disk_bytes=8 << 20))
    try:
        (tmp_path / (FILE_NAME + ".tmp")).mkdir()  # the catalog's temporary file cannot be created
        ns = _ns("a")
        store.register_namespace(ns)
        assert "not recorded in the catalog" in caplog.text
        assert store.lookup(ns, np.arange(16, dtype=np.uint32)).hit_tokens == 0  # usable in this process
    finally:
        store.close()
    assert not (tmp_path / FILE_NAME).exists()
