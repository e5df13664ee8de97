"""Fuzz: mutated and truncated containers either decode correctly or raise CodecError.

More than 10,000 cases over every codec here: truncation at every offset of
the prefix, header and section boundaries (and a stride elsewhere), bit
flips, byte insertions and deletions, prefix fields set to edge values,
header fields replaced with wrong types and huge values and re-packed with a
fresh header checksum (so the schema checks, not the checksum, must catch
them), whole headers drawn by hypothesis, and random bytes. Each decode is
timed; none may take a second.
"""

from __future__ import annotations

import copy
import random
import struct
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.codecs.container import ALIGN
from kvstore.errors import CodecError
from kvstore.spec import KVSpec, ModelFingerprint
from tests.codecs.test_container import assemble, split

SPEC = KVSpec(ModelFingerprint("fuzz/model"), 2, 2, 8, "bfloat16")
LAYOUT = ChunkLayout(SPEC, 16)
MLA = ChunkLayout(KVSpec(ModelFingerprint("fuzz/mla"), 2, 1, 24, "float32", "mla_latent"), 12)
CODECS: list[tuple[str, dict[str, Any] | None, ChunkLayout]] = [
    ("raw", None, LAYOUT),
    ("lossless", None, LAYOUT),
    ("lossless", {"level": 3}, MLA),
    ("quant", {"bits": 8}, LAYOUT),
    ("quant", {"bits": 4, "group": "kivi"}, LAYOUT),
    ("quant", {"bits": 2, "group": "channel", "group_size": 5}, MLA),
    ("quant", {"bits": 8, "format": "e4m3", "group": "channel"}, LAYOUT),
]
EVIL: list[Any] = [
    None, True, False, 0, -1, 1, 3, 255, 2**31, 2**32 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, float("nan"),
    float("inf"), "", "x" * 2000, "float16", "kivi", "lossless", b"\x00\x01", [], [1] * 40, {}, {"a": 1},
    [[[[[1]]]]], {str(i): i for i in range(40)},
]
MAX_CASE_SECONDS = 1.0


class Base:
    """One valid container and what decoding it must give."""

    def __init__(self, name: str, params: dict[str, Any] | None, layout: ChunkLayout, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[layout.spec.dtype]
        x = (torch.randn(layout.shape, generator=g) * 2).to(dtype)
        self.codec = make_codec(name, params)
        self.buf = self.codec.encode(x.view(-1).view(torch.uint8).numpy(), layout)
        self.expected = self._decode(self.buf)
        self.header, self.payloads = split(self.buf)
        if self.codec.lossless:
            assert np.array_equal(self.expected[: layout.nbytes], x.view(-1).view(torch.uint8).numpy())

    def _decode(self, buf: bytes) -> np.ndarray:
        out = np.zeros(self.codec_out_size(), dtype=np.uint8)
        self.codec.decode_into(buf, out)
        return out

    def codec_out_size(self) -> int:
        return 1 << 16  # larger than any layout here: a too-small output is never the reason to fail

    def boundaries(self) -> list[int]:
        """Offsets where parsing changes state: prefix fields, header, every section start and end."""
        hlen = 18 + int(struct.unpack_from("<I", self.buf, 6)[0])
        points = [0, 4, 6, 10, 18, hlen, -(-hlen // ALIGN) * ALIGN, len(self.buf)]
        for s in self.header["sections"]:
            points += [s["offset"], s["offset"] + s["length"]]
        return points


class Stats:
    def __init__(self) -> None:
        self.cases = self.decoded = self.rejected = 0
        self.slowest = 0.0


def check(base: Base, buf: bytes, stats: Stats, what: str, *, same_meaning: bool = True) -> None:
    """Decode ``buf``: it must raise CodecError or decode; identically when ``same_meaning``."""
    stats.cases += 1
    start = time.perf_counter()
    try:
        out = base._decode(buf)
    except CodecError:
        stats.rejected += 1
        out = None
    except Exception as exc:  # anything else is the bug this test hunts
        raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - start
    stats.slowest = max(stats.slowest, elapsed)
    assert elapsed < MAX_CASE_SECONDS, f"{what}: decode took {elapsed:.2f}s"
    if out is not None:
        stats.decoded += 1
        if same_meaning or base.codec.lossless:
            assert np.array_equal(out, base.expected), f"{what}: decoded to different bytes"


def truncations(base: Base) -> Iterator[tuple[str, bytes]]:
    n = len(base.buf)
    cuts = set(range(min(n, 600))) | set(range(0, n, 7))
    for b in base.boundaries():
        cuts |= {c for c in range(b - 3, b + 4) if 0 <= c < n}
    for cut in sorted(cuts):
        yield f"truncated at {cut}", base.buf[:cut]


def flips(base: Base, rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    n = len(base.buf)
    for _ in range(count):
        buf = bytearray(base.buf)
        positions = [rng.randrange(n * 8) for _ in range(rng.choice([1, 1, 2, 3]))]
        for p in positions:
            buf[p // 8] ^= 1 << (p % 8)
        yield f"bit flips {positions}", bytes(buf)


def splices(base: Base, rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    n = len(base.buf)
    points = base.boundaries()
    for i in range(count):
        at = rng.choice(points) if i % 3 == 0 else rng.randrange(n + 1)
        at = min(max(at, 0), n)
        k = rng.choice([1, 1, 2, 7, 64])
        if i % 2:
            yield f"insert {k} at {at}", base.buf[:at] + bytes(rng.randrange(256) for _ in range(k)) + base.buf[at:]
        else:
            yield f"delete {k} at {at}", base.buf[:at] + base.buf[at + k :]


def prefix_edits(base: Base) -> Iterator[tuple[str, bytes]]:
    buf = base.buf
    for magic in [b"KVC0", b"kvc1", b"\0\0\0\0", b"KVC1"[::-1]]:
        yield f"magic {magic!r}", magic + buf[4:]
    for version in [0, 2, 255, 0xFFFF]:
        yield f"version {version}", buf[:4] + struct.pack("<H", version) + buf[6:]
    hlen = struct.unpack_from("<I", buf, 6)[0]
    for value in [0, 1, hlen - 1, hlen + 1, hlen + 64, 1 << 16, (1 << 16) + 1, len(buf), 2**32 - 1]:
        yield f"header length {value}", buf[:6] + struct.pack("<I", value) + buf[10:]
    for value in [0, 2**64 - 1]:
        yield f"header checksum {value}", buf[:10] + struct.pack("<Q", value) + buf[18:]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _replace(header: dict[str, Any], path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    h = copy.deepcopy(header)
    node = h
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return h


def header_edits(base: Base) -> Iterator[tuple[str, bytes, bool]]:
    """(what, container, keeps the meaning) for every header field set to every evil value."""
    for path in _paths(base.header):
        for value in EVIL:
            mutated = _replace(base.header, path, value)
            same = len(path) >= 2 and path[0] == "spec" and path[1] in ("model", "revision")
            keep_offsets = bool(path) and path[-1] == "offset"
            yield f"header{list(path)} = {value!r:.40}", assemble(mutated, base.payloads, place=not keep_offsets), same
        if path and isinstance(path[-1], str):
            removed = copy.deepcopy(base.header)
            node = removed
            for key in path[:-1]:
                node = node[key]
            del node[path[-1]]
            yield f"header{list(path)} removed", assemble(removed, base.payloads), False
        if path and isinstance(_get(base.header, path), dict):
            added = _replace(base.header, path, {**_get(base.header, path), "unknown": 1})
            yield f"header{list(path)} + unknown field", assemble(added, base.payloads), False


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


@pytest.fixture(scope="module")
def bases() -> list[Base]:
    return [Base(name, params, layout, seed) for seed, (name, params, layout) in enumerate(CODECS)]


def test_fuzz_mutated_and_truncated_containers(bases: list[Base]) -> None:
    rng = random.Random(20261123)
    stats = Stats()
    started = time.perf_counter()
    for base in bases:
        check(base, base.buf, stats, "unmodified")
        for what, buf in truncations(base):
            check(base, buf, stats, what)
        for what, buf in flips(base, rng, 700):
            check(base, buf, stats, what)
        for what, buf in splices(base, rng, 300):
            check(base, buf, stats, what)
        for what, buf in prefix_edits(base):
            check(base, buf, stats, what)
        for what, buf, same in header_edits(base):
            check(base, buf, stats, what, same_meaning=same)
        for i in range(40):
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
            check(base, base.buf[:18] + junk if i % 2 else junk, stats, f"random bytes {i}")
    elapsed = time.perf_counter() - started
    assert stats.cases >= 10_000, stats.cases
    # nearly everything must be caught; what decodes is the original or a header rewrite that means the same
    assert stats.rejected >= stats.cases * 0.9
    print(f"fuzz: {stats.cases} cases, {stats.rejected} rejected, {stats.decoded} decoded, "
          f"slowest {stats.slowest * 1e3:.1f} ms, total {elapsed:.1f} s")


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=16,
)
_KEYS = ["codec", "params", "spec", "num_tokens", "dtype", "shape", "sections"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), _msgpack_values, max_size=8),
       st.integers(min_value=0, max_value=len(CODECS) - 1))
def test_fuzz_hypothesis_headers(header: dict[str, Any], which: int) -> None:
    base = _hypothesis_bases()[which]
    merged = {**base.header, **header}  # drawn fields replace real ones; the rest stay valid
    stats = Stats()
    check(base, assemble(merged, base.payloads), stats, f"header {merged!r:.200}", same_meaning=False)
    check(base, assemble(header, base.payloads), stats, f"header {header!r:.200}", same_meaning=False)


_BASES: list[Base] = []


def _hypothesis_bases() -> list[Base]:
    if not _BASES:
        _BASES.extend(Base(name, params, layout, seed) for seed, (name, params, layout) in enumerate(CODECS))
    return _BASES
