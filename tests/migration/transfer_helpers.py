"""Helpers of the transfer tests: two daemons, a self-signed certificate made now, a faulty TCP relay, float chunks."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kvstore.client import Client
from kvstore.keys import ChunkKey, Namespace, prefix_keys
from tests.service.daemon_fixtures import TOKENS, DaemonProc


@contextmanager
def daemon_pair(root: Path) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    """Two daemons with the test tokens (``a`` sends, ``b`` receives), stopped afterwards."""
    a = DaemonProc(root / "a", tokens=TOKENS, name="a").start()
    b = DaemonProc(root / "b", tokens=TOKENS, name="b").start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key (PEM files), made at test time."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        _with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            raise RuntimeError("neither the cryptography package nor openssl is available") from None
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)  # fmt: skip
    return cert, key


def _with_cryptography(cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2)).add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip


@contextmanager
def ports_held(*ports: int) -> Iterator[None]:
    """Keep loopback ``ports`` bound (SO_REUSEADDR, not listening) while the daemon that used them is
    down, and through its restart on them.

    A connection to them is refused at once, as to a dead daemon, and no other process is handed
    them: ports from ``free_port`` are ephemeral ones, and while a peer is down (a push's reconnect
    backoff, then its restart: seconds under load) another test's ``free_port`` or connection may
    get one; a push would then talk to that process (and hang on its HELLO, or store into it) and
    the restart would find the port taken. The daemon itself binds them again (its listener sets
    SO_REUSEADDR too, which a bound socket that does not listen allows).
    """
    held = []
    try:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the dead daemon's TIME_WAITs
            held.append(sock)
            sock.bind(("127.0.0.1", port))
        yield
    finally:
        for sock in held:
            sock.close()


class FaultyRelay:
    """A TCP relay to ``target`` that, once, cuts the connection or flips one byte.

    ``cut_after``: after this many client->server bytes the first connection is
    closed both ways (a dropped link). ``flip_at``: the byte at this offset of
    the first connection's client->server stream is inverted (corruption in
    transit). Later connections are relayed faithfully.
    """

    def __init__(self, target_port: int, cut_after: int | None = None, flip_at: int | None = None) -> None:
        self.target_port = target_port
        self.cut_after, self.flip_at = cut_after, flip_at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.faults = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, first), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, faulty: bool) -> None:
        seen = 0
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if faulty and self.flip_at is not None and seen <= self.flip_at < seen + len(data):
                    data[self.flip_at - seen] ^= 0xFF
                    self.faults += 1
                if faulty and self.cut_after is not None and seen + len(data) >= self.cut_after:
                    dst.sendall(data[: self.cut_after - seen])
                    self.faults += 1
                    break
                dst.sendall(data)
                seen += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def float_chunks(ns: Namespace, n: int, seed: int = 0) -> tuple[list[ChunkKey], list[np.ndarray]]:
    """``n`` full chunks of ``ns`` with finite float KV (normal values), and their prefix keys."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50000, size=n * ns.chunk_tokens).tolist()
    keys = prefix_keys(ns, tokens)
    dtype = {"float16": np.float16, "float32": np.float32}[ns.spec.dtype]
    chunks = [rng.normal(0, 1, size=ns.chunk_nbytes // np.dtype(dtype).itemsize).astype(dtype) for _ in keys]
    return keys, chunks


def store_chunks(port: int, token: str | None, ns: Namespace, keys: list[ChunkKey], chunks: list[np.ndarray]) -> None:
    with Client(f"kvstore://127.0.0.1:{port}", token=token) as c:
        c.register(ns)
        assert all(c.put_many(ns, keys, chunks))


def read_chunks(port: int, token: str | None, ns: Namespace, keys: list[ChunkKey], nbytes: int,
                **client_args: object) -> list[bytes | None]:
    """Each chunk's bytes as the daemon serves them (checksums verified), None for a miss."""
    with Client(f"kvstore://127.0.0.1:{port}", token=token, verify=True, **client_args) as c:  # type: ignore[arg-type]
        c.register(ns)
        outs = [np.empty(nbytes, dtype=np.uint8) for _ in keys]
        sizes = c.get_many(ns, keys, outs)
        return [None if s is None else o[:s].tobytes() for s, o in zip(sizes, outs)]
