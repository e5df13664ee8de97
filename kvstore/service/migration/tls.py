"""TLS for the data plane: the server's and the client's SSL contexts, and a sender for TLS connections.

The plain data plane writes replies with ``sendmsg`` on a duplicate of the
socket (``dataplane_sender``), which would bypass the encryption; a TLS
connection writes through its transport instead (:class:`TransportSender`),
one copy per frame. TLS is offered on the TCP listener only: the Unix socket
and its shared-memory path stay local to the host.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence

from kvstore.errors import InvalidInput, KVStoreError

OnSent = Callable[[bool], None]


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The data plane's TLS context (TLS 1.2 or later).

    Raises:
        InvalidInput: the certificate or key cannot be read or do not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(f"cannot load the TLS certificate {cert_file!r} and key {key_file!r}: {exc}") from None
    return ctx


def client_context(ca_file: str | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file`` (None: the system's trust store).

    Raises:
        InvalidInput: the CA file cannot be read.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot load the TLS CA file {ca_file!r}: {exc}") from None
    return ctx


def is_tls(transport: asyncio.BaseTransport) -> bool:
    return transport.get_extra_info("ssl_object") is not None


class TransportSender:
    """The ``Sender`` interface over an asyncio (TLS) transport.

    Each frame is joined into one bytes object before it is handed to the
    transport, so ``on_sent`` may run at once: nothing refers to the caller's
    buffers (e.g. pinned arena extents) afterwards. The transport's own
    write-buffer limits pause the connection's reading when the peer is slow.
    """

    def __init__(self, transport: asyncio.Transport, on_bytes: Callable[[int], None]) -> None:
        self._transport = transport
        self._on_bytes = on_bytes
        self._closed = False
        self.queued_bytes = 0

    @property
    def idle(self) -> bool:
        return self._closed or self._transport.get_write_buffer_size() == 0

    @property
    def queued_items(self) -> int:
        return 0

    def send(self, bufs: Sequence[bytes | memoryview], on_sent: OnSent | None = None) -> None:
        if self._closed or self._transport.is_closing():
            if on_sent is not None:
                on_sent(False)
            return
        data = b"".join(bufs)
        self._transport.write(data)
        self._on_bytes(len(data))
        if on_sent is not None:
            on_sent(True)

    async def wait_idle(self) -> None:
        while not self.idle:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self._closed = True


class TLSError(KVStoreError, ConnectionError):
    """A TLS handshake failed: an untrusted or mismatched certificate, or TLS on one side only.

    Not retried: repeating the handshake cannot change its outcome.
    """
