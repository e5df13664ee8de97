"""Keys: byte-exact test vectors, independence from the interpreter, isolation."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvstore.errors import InvalidInput, UnknownName
from kvstore.keys import (
    Namespace,
    content_key,
    engine_prefix_keys,
    iter_prefix_keys,
    prefix_keys,
    split_tokens,
)
from kvstore.spec import KVSpec, ModelFingerprint, Shard

SPEC = KVSpec(ModelFingerprint("HuggingFaceTB/SmolLM2-135M-Instruct", "q4_1"), 30, 3, 64, "bfloat16")
NS = Namespace("tenant-a", SPEC, chunk_tokens=4)

NS_ID = "59d56a84e6d9ac55a141df456fd44c3ce48c65bb3e71dd0779101974174a7ac9"
PREFIX = [
    "410111c2e588dbf3ad8c219f5a0b357893e5b188ada74aa5bfa07625b1d15ce9",
    "1394c0c130243011284352c8889ac437643325df53205da926785fc514687ca8",
]
CONTENT = "b9dd4217636836a03c851539c875e1e80f9e8acd3cd0094ef4899e27cc392355"
ENGINE = [
    "0c605d94c51b22ff200ff69a9a821718cdd8a5b6d735c0ec9492388af1269933",
    "04c866c64f0dcb6bca97692fb939e61fd712167882b20921c99eb5d2cedf488a",
]


def _field(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<I", len(raw)) + raw


def _reference_ns_id(tenant: str, scheme: str, chunk: int) -> bytes:
    """docs/keys.md, written out independently of kvstore.keys."""
    spec = b"".join(
        _field(x)
        for x in [
            "HuggingFaceTB/SmolLM2-135M-Instruct", "q4_1", "30", "3", "64", "bfloat16", "kv_separate",
            "0", "1", "0", "1",
        ]
    )
    return hashlib.sha256(b"kvstore-ns-v1\x00" + _field(tenant) + _field(scheme) + _field(str(chunk)) + spec).digest()


def test_vectors_match_docs_and_an_independent_reference() -> None:
    assert NS.id.hex() == NS_ID
    assert _reference_ns_id("tenant-a", "sha256-chain-v1", 4).hex() == NS_ID
    keys = prefix_keys(NS, list(range(10)))
    assert [k.hex() for k in keys] == PREFIX
    prev = bytes(32)
    for i in range(2):
        toks = struct.pack("<4I", *range(4 * i, 4 * i + 4))
        prev = hashlib.sha256(b"kvstore-prefix-v1\x00" + NS.id + struct.pack("<I", 4) + prev + toks).digest()
        assert prev.hex() == PREFIX[i]
    assert content_key(NS, [1, 2, 3]).hex() == CONTENT
    ref = hashlib.sha256(b"kvstore-content-v1\x00" + NS.id + struct.pack("<I", 3) + struct.pack("<3I", 1, 2, 3))
    assert ref.hexdigest() == CONTENT


def test_engine_vectors() -> None:
    ns = Namespace("tenant-a", SPEC, scheme="vllm", chunk_tokens=4)
    keys = engine_prefix_keys(ns, [b"\x01" * 32, 12345, b"\x02" * 32, "abc"], block_size=2)
    assert [k.hex() for k in keys] == ENGINE
    base = b"kvstore-engine-v1\x00" + ns.id + struct.pack("<I", 2)
    h0 = b"\x03" + struct.pack("<I", 32) + (12345).to_bytes(32, "little", signed=True)
    h1 = b"\x02" + struct.pack("<I", 3) + b"abc"
    assert hashlib.sha256(base + h0).hexdigest() == ENGINE[0]
    assert hashlib.sha256(base + h1).hexdigest() == ENGINE[1]


_CHILD = """
import sys
from kvstore.keys import Namespace, prefix_keys, content_key
from kvstore.spec import KVSpec, ModelFingerprint
ns = Namespace("t", KVSpec(ModelFingerprint("m", "r"), 2, 2, 4), chunk_tokens=8)
print(",".join(k.hex() for k in prefix_keys(ns, list(range(100)))), content_key(ns, [5, 6]).hex())
"""


def test_keys_identical_across_interpreters_with_different_hash_seeds() -> None:
    outs = set()
    for seed in ("0", "1", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
        outs.add(out.stdout)
    assert len(outs) == 1
    assert len(next(iter(outs)).split(",")) == 12  # 100 tokens / 8 = 12 full chunks


def test_token_containers_give_the_same_keys() -> None:
    toks = list(range(1000, 1012))
    expected = prefix_keys(NS, toks)
    assert prefix_keys(NS, np.array(toks, dtype=np.int64)) == expected
    assert prefix_keys(NS, np.array(toks, dtype=np.uint32)) == expected
    assert prefix_keys(NS, torch.tensor(toks)) == expected
    assert list(iter_prefix_keys(NS, toks)) == expected


def test_prefix_keys_chain_and_partial_tail_is_not_keyed() -> None:
    a = prefix_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = prefix_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8])
    assert a == b and len(a) == 2
    c = prefix_keys(NS, [9, 2, 3, 4, 5, 6, 7, 8])  # first chunk differs: every later key differs
    assert c[0] != a[0] and c[1] != a[1]
    assert prefix_keys(NS, [1, 2, 3]) == []
    split = split_tokens(NS, 9)
    assert (split.num_full_chunks, split.remainder_tokens) == (2, 1)


@pytest.mark.parametrize(
    "other",
    [
        Namespace("tenant-b", SPEC, chunk_tokens=4),
        Namespace("tenant-a", KVSpec(SPEC.model, 30, 3, 64, "float16"), chunk_tokens=4),
        Namespace("tenant-a", KVSpec(SPEC.model, 30, 3, 64, "float8_e4m3fn"), chunk_tokens=4),
        Namespace("tenant-a", KVSpec(ModelFingerprint(SPEC.model.name, "other"), 30, 3, 64), chunk_tokens=4),
        Namespace("tenant-a", KVSpec(SPEC.model, 30, 3, 64, shard=Shard(tp_rank=1, tp_size=2)), chunk_tokens=4),
        Namespace("tenant-a", KVSpec(SPEC.model, 30, 1, 64, layout="mla_latent"), chunk_tokens=4),
        Namespace("tenant-a", SPEC, chunk_tokens=2),
    ],
)
def test_namespaces_isolate_every_field(other: Namespace) -> None:
    assert other.id != NS.id
    toks = list(range(8))
    assert not set(prefix_keys(other, toks)) & set(prefix_keys(NS, toks))
    assert content_key(other, toks) != content_key(NS, toks)


def test_prefix_and_content_keys_never_meet() -> None:
    toks = list(range(4))
    assert prefix_keys(NS, toks)[0] != content_key(NS, toks)


@pytest.mark.parametrize(
    "tokens",
    [[-1, 2, 3, 4], [2**32, 1, 2, 3], np.zeros((2, 4), dtype=np.int64), np.array([1.0, 2.0, 3.0, 4.0])],
)
def test_bad_tokens_are_refused(tokens: object) -> None:
    with pytest.raises(InvalidInput):
        prefix_keys(NS, tokens)  # type: ignore[arg-type]


def test_bad_namespaces_and_engine_input() -> None:
    with pytest.raises(UnknownName):
        Namespace("t", SPEC, scheme="md5")
    with pytest.raises(InvalidInput):
        Namespace("", SPEC)
    with pytest.raises(InvalidInput):
        Namespace("t", SPEC, chunk_tokens=0)
    with pytest.raises(InvalidInput):
        content_key(NS, [])
    vns = Namespace("t", SPEC, scheme="sglang", chunk_tokens=4)
    with pytest.raises(InvalidInput):
        prefix_keys(vns, list(range(8)))  # engine schemes take block hashes
    with pytest.raises(InvalidInput):
        engine_prefix_keys(NS, [b"x"], 2)  # token scheme
    with pytest.raises(InvalidInput):
        engine_prefix_keys(vns, [b"x"], 3)  # 4 is not a multiple of 3
    with pytest.raises(InvalidInput):
        engine_prefix_keys(vns, [1.5, 2.5], 2)  # type: ignore[list-item]
    with pytest.raises(InvalidInput):
        engine_prefix_keys(vns, [b"", b""], 2)


def test_engine_keys_cover_only_full_chunks() -> None:
    ns = Namespace("t", SPEC, scheme="vllm", chunk_tokens=4)
    assert len(engine_prefix_keys(ns, [1, 2, 3], 2)) == 1
    assert engine_prefix_keys(ns, [1, 2], 2) == engine_prefix_keys(ns, [9, 2], 2)  # the last block names the chunk


def test_c_chain_and_python_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvstore.keys as keys_mod

    assert keys_mod._chainhash is not None, "the C hash helper was not built (setup.py, libssl-dev)"
    rng = np.random.default_rng()
    for chunk in (1, 4, 16, 256):
        ns = Namespace("t", SPEC, chunk_tokens=chunk)
        toks = rng.integers(0, 2**32, size=int(rng.integers(0, 3000)), dtype=np.uint64)
        fast = prefix_keys(ns, toks)
        monkeypatch.setattr(keys_mod, "_chainhash", None)
        slow = prefix_keys(ns, toks)
        monkeypatch.undo()
        assert fast == slow and len(fast) == len(toks) // chunk
