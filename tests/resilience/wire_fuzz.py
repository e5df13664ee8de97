"""Hostile frames for the data plane: hypothesis strategies and a checker that talks to a live daemon.

Each case is one frame (a well-formed prefix with a drawn header and payload)
or raw bytes (a drawn prefix or pure junk, then end-of-stream). The checker
sends it on a greeted connection and reads what comes back: a reply of a known
type within a bounded time, never an INTERNAL error; an error marked
``closing`` is followed by end-of-stream; raw bytes end in an error or a
close, never a hang.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from kvstore.service.protocol import (
    PREFIX_BYTES,
    ErrorCode,
    MsgType,
    decode_header,
    encode_header,
    pack_prefix,
    unpack_prefix,
)

REPLY_TIMEOUT_S = 15.0
FIELDS = ["ns", "keys", "sizes", "checksums", "checksum_trailer", "cost", "lease", "ttl_s", "capacity",
          "limit", "spec", "token", "client", "shm", "reservation", "index", "upto", "offsets", "pins",
          "abort", "tokens"]
REPLIES = {MsgType.OK, MsgType.HELLO_OK, MsgType.ERROR, MsgType.BUSY}


@dataclass
class Context:
    """What a greeted connection owns: its namespace id and some keys it stored."""

    ns: bytes
    keys: list[bytes]
    spec: dict[str, Any]


@dataclass
class Tally:
    cases: int = 0
    errors: int = 0
    closes: int = 0
    slowest_s: float = 0.0
    closes_expected: bool = False
    codes: dict[int, int] = field(default_factory=dict)


def scalars() -> st.SearchStrategy[Any]:
    return (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
            | st.text(max_size=16) | st.binary(max_size=40)
            | st.sampled_from([0, 1, -1, 2**31, 2**62, 2**64 - 1, 65536, 65537]))


def values(ctx: Context) -> st.SearchStrategy[Any]:
    real = st.sampled_from([ctx.ns, *ctx.keys, ctx.spec, bytes(16), bytes(32)])
    lists = st.lists(scalars() | real, max_size=8)
    return scalars() | real | lists | st.lists(st.sampled_from(ctx.keys), max_size=6) | st.dictionaries(
        st.text(max_size=10), scalars(), max_size=4)


def frames(ctx: Context) -> st.SearchStrategy[tuple[str, bytes]]:
    """('frame', bytes) for drawn frames, ('raw', bytes) for junk that ends the stream."""
    types = st.sampled_from([int(t) for t in MsgType]) | st.integers(0, 255)
    header = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values(ctx), max_size=6)
    framed = st.builds(_framed, types, header, st.binary(max_size=3000), st.integers(0, 2**32 - 1))
    raw_prefix = st.builds(
        lambda t, h, p, tail: pack_prefix(t, h, 1, p) + tail,
        types, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=64),
    )
    raw = st.tuples(st.just("raw"), raw_prefix | st.binary(max_size=200))
    return st.tuples(st.just("frame"), framed) | raw


def _framed(mt: int, header: dict[str, Any], payload: bytes, rid: int) -> bytes:
    raw = encode_header(header)
    return pack_prefix(mt, len(raw), rid, len(payload)) + raw + payload


class Prober:
    """A TCP connection greeted with a tenant token; reconnects whenever the daemon closes it."""

    def __init__(self, port: int, token: str, spec: dict[str, Any]) -> None:
        self.port, self.token, self.spec = port, token, spec
        self.sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        if self.sock is None:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=REPLY_TIMEOUT_S)
            self.sock = s
            self.request(MsgType.HELLO, {"token": self.token})
            self.request(MsgType.REGISTER, {"spec": self.spec})
        return self.sock

    def request(self, mt: int, header: dict[str, Any], payload: bytes = b"") -> tuple[int, dict[str, Any], bytes]:
        raw = encode_header(header)
        sock = self.connect()
        sock.sendall(pack_prefix(mt, len(raw), 1, len(payload)) + raw + payload)
        got = self.read()
        assert got is not None and got[0] in (MsgType.OK, MsgType.HELLO_OK), got
        return got

    def read(self) -> tuple[int, dict[str, Any], bytes] | None:
        """One reply, or None at end-of-stream."""
        head = self._recv(PREFIX_BYTES)
        if head is None:
            return None
        prefix = unpack_prefix(head, 1 << 40)
        header = decode_header(self._recv(prefix.header_len) or b"")
        return prefix.type, header, self._recv(prefix.payload_len) or b""

    def _recv(self, n: int) -> bytes | None:
        assert self.sock is not None
        buf = bytearray()
        while len(buf) < n:
            try:
                got = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                got = b""
            if not got:
                if buf:
                    raise AssertionError(f"the daemon closed mid-reply after {len(buf)} of {n} bytes")
                return None
            buf += got
        return bytes(buf)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def check(self, kind: str, data: bytes, tally: Tally) -> None:
        """Send one case and check the daemon's answer (see the module docstring)."""
        sock = self.connect()
        tally.closes_expected = False
        t0 = time.monotonic()
        try:
            sock.sendall(data)
            if kind == "raw":
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            self.close()
            return
        try:
            self._answers(kind, tally)
        finally:
            tally.cases += 1
            tally.slowest_s = max(tally.slowest_s, time.monotonic() - t0)

    def _answers(self, kind: str, tally: Tally) -> None:
        while True:
            got = self.read()
            if got is None:  # closed: only after junk or an error marked closing
                assert kind == "raw" or tally.closes_expected, "the daemon closed without an error"
                tally.closes += 1
                self.close()
                return
            mt, header, _ = got
            assert mt in REPLIES, f"unknown reply type {mt}"
            if mt == MsgType.ERROR:
                code = int(header["code"])
                assert code != ErrorCode.INTERNAL, f"internal error: {header}"
                assert isinstance(header.get("message"), str) and header["message"], header
                tally.errors += 1
                tally.codes[code] = tally.codes.get(code, 0) + 1
                if header.get("closing"):
                    tally.closes_expected = True
                    continue
            if kind == "raw":
                continue  # junk may hold several frames; read to end-of-stream
            tally.closes_expected = False
            return


EVIL: list[Any] = [None, True, -1, 0, 2**31, 2**62, 2**64 - 1, 1.5, float("nan"), "", "x" * 300, b"",
                   bytes(31), bytes(33), [], [None], [b"\x00" * 32] * 3, {}, {"a": 1}]


def valid_requests(ctx: Context) -> list[tuple[int, dict[str, Any], bytes]]:
    """One well-formed request of every type, on ``ctx``'s namespace and keys."""
    from kvstore.checksum import checksum
    from tests.resilience.common import payload

    k = ctx.keys[0]
    data = payload(k)  # a PUT that stays valid after its mutation stores the right bytes
    return [
        (MsgType.HELLO, {"token": "wrong", "client": "fuzz"}, b""),
        (MsgType.REGISTER, {"spec": ctx.spec}, b""),
        (MsgType.PUT, {"ns": ctx.ns, "keys": [k], "sizes": [2048], "checksums": [checksum(data)]}, data),
        (MsgType.LOOKUP, {"ns": ctx.ns, "keys": ctx.keys[:3], "lease": True, "ttl_s": 1.0}, b""),
        (MsgType.GET, {"ns": ctx.ns, "keys": ctx.keys[:2], "capacity": 2048}, b""),
        (MsgType.DELETE, {"ns": ctx.ns, "keys": [ctx.keys[-1]]}, b""),
        (MsgType.PREFETCH, {"ns": ctx.ns, "keys": ctx.keys[:2]}, b""),
        (MsgType.RELEASE, {"lease": 1}, b""),
        (MsgType.SHM_GET, {"ns": ctx.ns, "keys": ctx.keys[:1]}, b""),
        (MsgType.SHM_RELEASE, {"pins": [1]}, b""),
        (MsgType.SHM_RESERVE, {"ns": ctx.ns, "keys": [k], "sizes": [2048]}, b""),
        (MsgType.SHM_COMMIT, {"reservation": 1, "abort": True}, b""),
        (MsgType.STATS, {}, b""),
        (MsgType.PING, {}, b""),
        (MsgType.LIST, {"ns": ctx.ns, "limit": 5}, b""),
        (MsgType.SHM_WRITTEN, {"reservation": 1, "index": 0, "upto": 10}, b""),
    ]


def mutated(ctx: Context, rng: Any) -> tuple[str, bytes]:
    """A valid request with one to three mutations: a field set to an evil value, removed or added,
    the payload cut or grown, the type changed, or the bytes of the frame flipped (then sent as junk)."""
    mt, header, body = rng.choice(valid_requests(ctx))
    header = dict(header)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        if op == 0 and header:
            header[rng.choice(sorted(header))] = rng.choice(EVIL)
        elif op == 1 and header:
            del header[rng.choice(sorted(header))]
        elif op == 2:
            header[rng.choice(FIELDS)] = rng.choice(EVIL + ctx.keys)
        elif op == 3:
            body = body[: rng.randrange(len(body) + 1)] if body and rng.random() < 0.5 else body + bytes(rng.randrange(64))
        elif op == 4:
            mt = rng.randrange(256)
        else:
            raw = bytearray(_framed(mt, header, body, 7))
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] ^= rng.randint(1, 255)
            return "raw", bytes(raw)
    return "frame", _framed(mt, header, body, rng.randrange(2**32))
