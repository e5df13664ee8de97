"""Every codec round-trips KV through every kind of lower tier (CPU, LMDB, Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvstore.codecs.base import codec_names
from kvstore.errors import InvalidInput, UnknownName
from kvstore.keys import Namespace, prefix_keys
from kvstore.spec import KVSpec, ModelFingerprint
from kvstore.tiers.base import Tier
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.disk import DiskTier, DiskTierConfig
from kvstore.tiers.remote import RemoteTier, RemoteTierConfig
from kvstore.tiers.store import StoreConfig, TieredStore
from kvstore.tiers.tier_codecs import CodecChoice
from tests.redis_servers import RedisServer

SPEC = KVSpec(ModelFingerprint("m"), 4, 2, 64, "bfloat16")
NS = Namespace("t", SPEC, chunk_tokens=32)
CHUNK = NS.chunk_nbytes

CHOICES = {
    "raw": CodecChoice("raw"),
    "lossless": CodecChoice("lossless"),
    "int8": CodecChoice("quant", {"bits": 8}),
    "int4-kivi": CodecChoice("quant", {"bits": 4, "group": "kivi"}),
    "fp8": CodecChoice("quant", {"bits": 8, "format": "e4m3"}),
}
if "cachegen" in codec_names():
    CHOICES["cachegen"] = CodecChoice("cachegen")


def kv(i: int) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(32), generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def lower_tier(kind: str, tmp_path: Path, redis_url: str) -> Tier:
    if kind == "cpu":
        return CPUTier(CPUTierConfig(capacity_bytes=16 * CHUNK, alignment=256), "low")
    if kind == "disk":
        return DiskTier(DiskTierConfig(path=str(tmp_path / "disk"), capacity_bytes=64 * CHUNK), "low")
    return RemoteTier(RemoteTierConfig(redis_url, 64 * CHUNK, key_prefix=f"codec-{tmp_path.name}:"), "low")


@pytest.mark.parametrize("kind", ["cpu", "disk", "redis"])
@pytest.mark.parametrize("name", sorted(CHOICES))
def test_codec_round_trip_through_tier(kind: str, name: str, tmp_path: Path, redis_server: RedisServer) -> None:
    top = CPUTier(CPUTierConfig(capacity_bytes=CHUNK, alignment=256), "top")  # holds one chunk
    low = lower_tier(kind, tmp_path, redis_server.url)
    with TieredStore([top, low], StoreConfig(codecs={"low": CHOICES[name]})) as st:
        st.register_namespace(NS)
        toks = list(range(3 * 32))
        chunks = [kv(i) for i in range(3)]
        st.put_prefix(NS, toks, chunks)
        st.flush()
        keys = prefix_keys(NS, toks)
        meta = low.meta(keys[0])
        assert meta is not None
        if name not in ("raw", "lossless"):
            assert meta.nbytes < CHUNK  # stored compressed
        out = torch.empty(SPEC.chunk_shape(32), dtype=torch.bfloat16)
        assert st.get(NS, keys[0], out) == CHUNK  # from the lower tier, decoded
        err = (out.float() - chunks[0].float()).abs().max().item()
        if name in ("raw", "lossless"):
            assert torch.equal(out.view(torch.int16), chunks[0].view(torch.int16))
        else:
            assert 0 < err < 0.6 * chunks[0].float().abs().max().item()
        assert st.stats().decode_errors == 0


def test_codec_configuration_errors() -> None:
    top = CPUTier(CPUTierConfig(capacity_bytes=CHUNK), "top")
    low = CPUTier(CPUTierConfig(capacity_bytes=CHUNK), "low")
    with pytest.raises(InvalidInput):
        TieredStore([top, low], StoreConfig(codecs={"top": CodecChoice("lossless")}))
    with pytest.raises(UnknownName):
        TieredStore([top, low], StoreConfig(codecs={"low": CodecChoice("zip")}))
    with pytest.raises(InvalidInput):
        TieredStore([top, low], StoreConfig(codecs={"low": CodecChoice("quant", {"bits": 3})}))
    with TieredStore([top, low], StoreConfig(codecs={"low": CodecChoice("lossless")})) as st:
        st.register_namespace(NS)
        st.set_codec(NS, "low", "quant", {"bits": 8})
        with pytest.raises(InvalidInput):
            st.set_codec(NS, "top", "quant", {"bits": 8})  # the top tier holds raw KV


def test_corrupt_container_is_a_counted_miss(tmp_path: Path) -> None:
    top = CPUTier(CPUTierConfig(capacity_bytes=CHUNK, alignment=256), "top")
    low = CPUTier(CPUTierConfig(capacity_bytes=8 * CHUNK, alignment=256), "low")
    with TieredStore([top, low], StoreConfig(codecs={"low": CodecChoice("lossless")})) as st:
        st.register_namespace(NS)
        toks = list(range(64))
        st.put_prefix(NS, toks, [kv(0), kv(1)])
        st.flush()
        key = prefix_keys(NS, toks)[0]
        ext = low.locate(key)
        assert ext is not None
        low.region(ext)[ext.size // 2] ^= 0xFF  # flip a byte inside the stored container
        low.unpin(key)
        out = torch.empty(SPEC.chunk_shape(32), dtype=torch.bfloat16)
        assert st.get(NS, key, out) is None
        assert st.stats().decode_errors == 1 and not low.contains(key)


@pytest.mark.skipif("cachegen" not in codec_names(), reason="kvstore._rangecoder is not built")
@pytest.mark.parametrize("transform", [False, True])
def test_cachegen_with_a_profile_directory_through_a_tier(transform: bool, tmp_path: Path) -> None:
    """A tier's cachegen with ``profile_dir`` (the recommended setup): its containers name the profile
    (and, with a transform, format 4 carries ``transform``), and reads find it through the tier's codec."""
    import numpy as np

    from kvstore.codecs.base import ChunkLayout
    from kvstore.codecs.cachegen_params import CachegenParams
    from kvstore.codecs.cachegen_profile import build_profile
    from kvstore.codecs.cachegen_transform import HeadStatistics, build_transform
    layout = ChunkLayout(SPEC, 32)
    samples = [(kv(100 + i).contiguous().view(-1).view(torch.uint8).numpy(), layout) for i in range(2)]
    head = None
    if transform:
        rng = np.random.default_rng(0)
        a, b = rng.normal(size=(2, 8, 2, 64, 64))
        head = build_transform(HeadStatistics(a @ a.transpose(0, 1, 3, 2) * 1e-9, b @ b.transpose(0, 1, 3, 2)))
    profile = build_profile(samples, CachegenParams(level=1), transform=head)
    directory = tmp_path / "profiles"
    directory.mkdir()
    profile.save(directory)
    choice = CodecChoice("cachegen", {"profile": profile.digest, "profile_dir": str(directory)})
    top = CPUTier(CPUTierConfig(capacity_bytes=CHUNK, alignment=256), "top")  # holds one chunk
    low = DiskTier(DiskTierConfig(path=str(tmp_path / "disk"), capacity_bytes=64 * CHUNK), "low")
    with TieredStore([top, low], StoreConfig(codecs={"low": choice})) as st:
        st.register_namespace(NS)
        toks = list(range(3 * 32))
        chunks = [kv(i) for i in range(3)]
        st.put_prefix(NS, toks, chunks)
        st.flush()
        key = prefix_keys(NS, toks)[0]
        out = torch.empty(SPEC.chunk_shape(32), dtype=torch.bfloat16)
        assert st.get(NS, key, out) == CHUNK  # from the lower tier, decoded with the named profile
        assert st.stats().decode_errors == 0
        err = (out.float() - chunks[0].float()).abs().max().item()
        assert 0 < err < 0.6 * chunks[0].float().abs().max().item()
