"""Chunks held as codec containers reach the tiers below theirs as those tiers store them.

Two paths: a container stored as it arrived (a transfer's XPUT, ``store.encoded.put``) is
written through to the lower tiers, as it is where a tier's codec writes exactly that container,
decoded (and re-encoded) elsewhere; and in write-back mode a chunk evicted from an encoded tier
is demoted as its decoded KV, never as container bytes taken for KV.
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore.checksum import checksum
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.codecs.container import unpack
from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import StoreConfig, TieredStore
from kvstore.tiers.tier_codecs import CodecChoice

SPEC = KVSpec(ModelFingerprint("m"), 4, 2, 64, "bfloat16")
NS = Namespace("t", SPEC, chunk_tokens=32)
CHUNK = NS.chunk_nbytes
LOSSLESS = CodecChoice("lossless")


def kv(i: int) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(32), generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def raw(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(-1).view(torch.uint8).numpy()


def tiers(mid_chunks: int = 8) -> list[CPUTier]:
    return [
        CPUTier(CPUTierConfig(capacity_bytes=CHUNK, alignment=256), "top"),
        CPUTier(CPUTierConfig(capacity_bytes=mid_chunks * CHUNK, alignment=256), "mid"),
        CPUTier(CPUTierConfig(capacity_bytes=16 * CHUNK, alignment=256), "low"),
    ]


def test_container_put_as_it_arrived_is_written_through() -> None:
    top, mid, low = tiers()
    codecs = {"mid": LOSSLESS, "low": CodecChoice("quant", {"bits": 8})}
    with TieredStore([top, mid, low], StoreConfig(codecs=codecs)) as st:
        st.register_namespace(NS)
        x = kv(1)
        key = prefix_keys(NS, list(range(32)))[0]
        blob = make_codec("lossless").encode(raw(x), ChunkLayout(SPEC, 32))
        container = unpack(blob)
        assert st.encoded.tier_for(NS, container) == "mid"
        data = np.frombuffer(blob, np.uint8)
        assert st.encoded.put(NS, key, "mid", data, checksum(data), checksum(raw(x)))
        st.flush()
        held = low.view(key)
        assert held is not None  # written through, re-encoded with low's own codec
        assert unpack(bytes(held)).codec == "quant"
        out = torch.empty_like(x)
        assert st.codecs.decode_into(NS, held, raw(out)) == CHUNK
        assert (out.float() - x.float()).abs().max() < 0.05 * x.float().abs().max()


def test_container_goes_down_as_it_is_where_the_codec_matches() -> None:
    top, mid, low = tiers()
    with TieredStore([top, mid, low], StoreConfig(codecs={"mid": LOSSLESS, "low": LOSSLESS})) as st:
        st.register_namespace(NS)
        x = kv(2)
        key = prefix_keys(NS, list(range(32)))[0]
        blob = make_codec("lossless").encode(raw(x), ChunkLayout(SPEC, 32))
        data = np.frombuffer(blob, np.uint8)
        assert st.encoded.put(NS, key, "mid", data, checksum(data))
        st.flush()
        held = low.view(key)
        assert held is not None and bytes(held) == blob  # the same container, not re-encoded


def test_container_that_decodes_to_other_bytes_is_not_written_down() -> None:
    top, mid, low = tiers()
    with TieredStore([top, mid, low], StoreConfig(codecs={"mid": LOSSLESS})) as st:
        st.register_namespace(NS)
        key = prefix_keys(NS, list(range(32)))[0]
        blob = make_codec("lossless").encode(raw(kv(3)), ChunkLayout(SPEC, 32))
        data = np.frombuffer(blob, np.uint8)
        wrong = checksum(raw(kv(4)))  # the sender's checksum of the decoded chunk does not match
        assert st.encoded.put(NS, key, "mid", data, checksum(data), wrong)
        st.flush()
        assert low.view(key) is None  # low is raw: it would need the decoded bytes, which are wrong
        assert st.stats().writer.failed == 1


def test_write_back_demotes_decoded_kv_from_an_encoded_tier() -> None:
    top, mid, low = tiers(mid_chunks=1)  # mid holds about one container: evictions demote to low
    config = StoreConfig(codecs={"mid": LOSSLESS}, write_mode="write_back")
    with TieredStore([top, mid, low], config) as st:
        st.register_namespace(NS)
        toks = list(range(6 * 32))
        chunks = [kv(10 + i) for i in range(6)]
        st.put_prefix(NS, toks, chunks)
        st.flush()
        keys = prefix_keys(NS, toks)
        held = low.view(keys[0])
        assert held is not None and bytes(held) == bytes(raw(chunks[0]))  # raw KV, not a container
        out = torch.empty_like(chunks[0])
        for key, x in zip(keys, chunks):
            assert st.get(NS, key, out) == CHUNK
            assert torch.equal(out.view(torch.int16), x.view(torch.int16))
            st.flush()  # the promotion's own demotions land before the next read
        assert st.stats().decode_errors == 0
