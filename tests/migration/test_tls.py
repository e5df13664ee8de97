"""TLS on the data plane: a self-signed certificate made now, trusted or not, and a transfer over TLS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import AsyncClient, Client, RemoteUnavailable
from kvstore.errors import InvalidInput
from kvstore.service.migration.tls import TLSError, server_context
from tests.migration.test_transfer import NS, wait
from tests.migration.transfer_helpers import float_chunks, read_chunks, self_signed, store_chunks
from tests.service.daemon_fixtures import HAVE_DATAPLANE, TOKEN_A, TOKENS, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, cert: tuple[Path, Path]) -> Iterator[DaemonProc]:
    c, k = cert
    d = DaemonProc(tmp_path_factory.mktemp("tlsd"), tokens=TOKENS, args=["--tls-cert", str(c), "--tls-key", str(k)])
    d.start()
    yield d
    d.stop()


def test_clients_with_the_ca_store_and_read_over_tls(tls_daemon: DaemonProc, cert: tuple[Path, Path]) -> None:
    keys, chunks = float_chunks(NS, 3, seed=20)
    with Client(f"kvstores://127.0.0.1:{tls_daemon.port}", token=TOKEN_A, tls_ca=str(cert[0])) as c:
        c.register(NS)
        assert c.put_many(NS, keys, chunks) == [True] * 3
    got = read_chunks(tls_daemon.port, TOKEN_A, NS, keys, NS.chunk_nbytes, tls_ca=str(cert[0]))
    assert got == [x.tobytes() for x in chunks]

    async def go() -> list[bool]:
        async with AsyncClient(f"kvstore://127.0.0.1:{tls_daemon.port}", token=TOKEN_A, tls_ca=str(cert[0])) as c:
            await c.register(NS)
            out = np.empty(NS.chunk_nbytes, np.uint8)
            assert await c.get(NS, keys[2], out) == NS.chunk_nbytes and out.tobytes() == chunks[2].tobytes()
            return await c.have(NS, keys)

    assert asyncio.run(go()) == [True] * 3


def test_untrusted_certificate_and_plain_clients_are_refused(tls_daemon: DaemonProc) -> None:
    url = f"kvstores://127.0.0.1:{tls_daemon.port}"
    with pytest.raises(TLSError, match="certificate"):
        Client(url, token=TOKEN_A, retries=0).ping()  # the system store does not trust it

    async def untrusted() -> None:
        async with AsyncClient(url, token=TOKEN_A, retries=0) as c:
            await c.ping()

    with pytest.raises(TLSError, match="certificate"):
        asyncio.run(untrusted())
    with pytest.raises(RemoteUnavailable):  # plain frames to a TLS listener: the handshake fails, it closes
        Client(f"kvstore://127.0.0.1:{tls_daemon.port}", token=TOKEN_A, retries=0, timeout_s=5).ping()
    assert tls_daemon.call("GET", "/healthz").status == 200  # the daemon serves on


def test_tls_client_to_a_plain_daemon_fails_clearly(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    d = DaemonProc(tmp_path, tokens=TOKENS).start()
    try:
        with pytest.raises(TLSError):
            Client(f"kvstores://127.0.0.1:{d.port}", token=TOKEN_A, retries=0, tls_ca=str(cert[0])).ping()
    finally:
        d.stop()


def test_bad_tls_files_are_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(InvalidInput, match="cannot load"):
        server_context(missing, missing)
    d = DaemonProc(tmp_path / "d", args=["--tls-cert", missing])
    with pytest.raises(RuntimeError, match="tls_key"):
        d.start()


def test_transfer_between_daemons_over_tls(tmp_path: Path, tls_daemon: DaemonProc, cert: tuple[Path, Path]) -> None:
    src = DaemonProc(tmp_path, tokens=TOKENS, args=["--transfer-tls-ca", str(cert[0])]).start()
    try:
        keys, chunks = float_chunks(NS, 6, seed=21)
        store_chunks(src.port, TOKEN_A, NS, keys, chunks)
        body = {"peer": f"kvstores://127.0.0.1:{tls_daemon.port}", "namespace": NS.id.hex(), "token": TOKEN_A,
                "keys": [k.hex() for k in keys], "codec": "lossless"}  # fmt: skip
        reply = src.call("POST", "/v1/transfers", body, TOKEN_A)
        assert reply.status == 200, reply
        p = wait(src, reply.json()["id"])
        assert p["state"] == "done" and p["codecs"] == {"lossless": 6}, p
        got = read_chunks(tls_daemon.port, TOKEN_A, NS, keys, NS.chunk_nbytes, tls_ca=str(cert[0]))
        assert got == [x.tobytes() for x in chunks]
        # the same push without the CA: the handshake fails and the transfer says so
        plain = DaemonProc(tmp_path / "p", tokens=TOKENS).start()
        try:
            store_chunks(plain.port, TOKEN_A, NS, keys, chunks)
            reply = plain.call("POST", "/v1/transfers", body, TOKEN_A)
            t0 = time.monotonic()
            p = wait(plain, reply.json()["id"])
            assert p["state"] == "failed" and "TLS" in p["error"], p
            assert time.monotonic() - t0 < 10  # not retried: a handshake that failed fails again
        finally:
            plain.stop()
    finally:
        src.stop()
