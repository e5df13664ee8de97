"""HAVE and XPUT on a real daemon's data plane: every bad frame gets a clear error and nothing is stored."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.checksum import checksum
from kvstore.client import AsyncClient, ChunkCorrupt, InvalidInput
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.keys import Namespace
from kvstore.service.protocol import MsgType, decode_header, frame, unpack_prefix
from kvstore.spec import KVSpec, ModelFingerprint
from tests.migration.transfer_helpers import float_chunks
from tests.service.daemon_fixtures import HAVE_DATAPLANE, TOKEN_A, TOKENS, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")
NS = Namespace("tenant-a", KVSpec(ModelFingerprint("xput-test"), 2, 2, 32, "float16"), chunk_tokens=16)
OTHER = Namespace("tenant-a", KVSpec(ModelFingerprint("xput-other"), 2, 2, 32, "float16"), chunk_tokens=16)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("xput"), tokens=TOKENS).start()
    yield d
    d.stop()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _client(d: DaemonProc) -> AsyncClient:
    c = await AsyncClient.connect(f"kvstore://127.0.0.1:{d.port}", token=TOKEN_A, retries=0)
    await c.register(NS)
    await c.register(OTHER)
    return c


def _container(ns: Namespace, chunk: np.ndarray, codec: str = "lossless") -> bytes:
    raw = chunk.view(np.uint8).reshape(-1)
    return make_codec(codec).encode(raw, ChunkLayout(ns.spec, ns.chunk_tokens))


def test_xput_stores_raw_and_containers_and_have_reports_them(daemon: DaemonProc) -> None:
    keys, chunks = float_chunks(NS, 3, seed=10)

    async def go() -> None:
        c = await _client(daemon)
        try:
            assert await c.have(NS, keys) == [False] * 3
            raw = chunks[0].tobytes()
            r = await c.xput(NS, keys[:2], [raw, _container(NS, chunks[1])], ["raw", "lossless"],
                             [checksum(np.frombuffer(raw, np.uint8)), checksum(chunks[1].view(np.uint8))])
            assert r.stored == [True, True] and r.decode_s >= 0
            assert await c.have(NS, keys) == [True, True, False]
            out = np.empty(NS.chunk_nbytes, np.uint8)
            assert await c.get(NS, keys[1], out) == NS.chunk_nbytes
            assert out.tobytes() == chunks[1].tobytes()  # lossless container decoded bit-exact
        finally:
            await c.close()

    run(go())


def test_xput_refuses_wrong_spec_corrupt_and_mismatched_chunks(daemon: DaemonProc) -> None:
    keys, chunks = float_chunks(NS, 4, seed=11)

    async def go() -> None:
        c = await _client(daemon)
        try:
            wrong = _container(OTHER, chunks[0])
            with pytest.raises(InvalidInput, match="another spec"):
                await c.xput(NS, keys[:1], [wrong], ["lossless"])
            good = _container(NS, chunks[1])
            broken = bytearray(good)
            broken[-10] ^= 0x55  # a section byte: the wire checksum is computed over the broken bytes
            with pytest.raises(ChunkCorrupt):
                await c.xput(NS, keys[1:2], [bytes(broken)], ["lossless"])
            with pytest.raises(ChunkCorrupt, match="sender's checksum"):
                await c.xput(NS, keys[2:3], [chunks[2].tobytes()], ["raw"], [bytes(16)])
            with pytest.raises(InvalidInput, match="whole number of tokens"):
                await c.xput(NS, keys[3:4], [b"\x00" * 100], ["raw"])
            with pytest.raises(InvalidInput, match="container"):
                await c.xput(NS, keys[3:4], [good], ["quant"])  # the header names another codec
            # one bad chunk in a batch: nothing of the batch is stored
            with pytest.raises(InvalidInput):
                await c.xput(NS, keys[:2], [chunks[0].tobytes(), wrong], ["raw", "lossless"])
            assert await c.have(NS, keys) == [False] * 4
        finally:
            await c.close()

    run(go())


def _raw_call(d: DaemonProc, mt: MsgType, header: dict[str, object], payload: bytes) -> dict[str, object]:
    """One request over a plain socket after HELLO; the reply header (ERROR carries code and message)."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        f = s.makefile("rb")
        s.sendall(frame(MsgType.HELLO, 1, {"token": TOKEN_A}))
        _read(f)
        s.sendall(frame(mt, 2, header, len(payload)) + payload)
        reply = _read(f)
        s.sendall(frame(MsgType.PING, 3, {}))  # the connection goes on after a bad request
        assert _read(f) == {}
        return reply


def _read(f) -> dict[str, object]:  # type: ignore[no-untyped-def]
    prefix = unpack_prefix(f.read(24), 1 << 30)
    header = decode_header(f.read(prefix.header_len))
    f.read(prefix.payload_len)
    return header


def test_malformed_xput_frames_get_bad_request_and_the_connection_goes_on(daemon: DaemonProc) -> None:
    keys, chunks = float_chunks(NS, 1, seed=12)
    raw = chunks[0].tobytes()
    base = {"ns": NS.id, "keys": keys, "sizes": [len(raw)], "checksums": [checksum(np.frombuffer(raw, np.uint8))],
            "codecs": ["raw"]}  # fmt: skip

    async def register() -> None:
        await (await _client(daemon)).close()

    run(register())
    bad = [
        ({**base, "codecs": None}, "codecs"),
        ({**base, "codecs": ["raw", "raw"]}, "codecs"),
        ({**base, "codecs": [""]}, "codecs"),
        ({**base, "sizes": [len(raw) + 1]}, "sizes"),
        ({**base, "checksums": [b"short"]}, "checksums"),
        ({**base, "raw_checksums": [b"x"]}, "raw_checksums"),
        ({**base, "ns": b"\x00" * 32}, "namespace"),
    ]
    for header, word in bad:
        reply = _raw_call(daemon, MsgType.XPUT, header, raw)
        assert reply.get("code") in (2, 5), reply
        assert word in str(reply["message"]).lower() or reply["code"] == 5, reply
    flipped = bytearray(raw)
    flipped[7] ^= 1
    reply = _raw_call(daemon, MsgType.XPUT, base, bytes(flipped))
    assert reply["code"] == 11 and "checksum" in str(reply["message"])
    assert _raw_call(daemon, MsgType.HAVE, {"ns": NS.id, "keys": keys}, b"") == {"present": [False], "stores": []}
    assert _raw_call(daemon, MsgType.HAVE, {"ns": NS.id, "keys": ["x"]}, b"")["code"] == 2


def test_unauthenticated_xput_is_refused(daemon: DaemonProc, tmp_path: Path) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        f = s.makefile("rb")
        s.sendall(frame(MsgType.XPUT, 1, {"ns": NS.id}, 4) + b"abcd")
        assert _read(f)["code"] == 3
