"""A TCP relay that delays each direction by half a round-trip time, without limiting throughput.

The kernel here has no ``netem``, so the network lab adds latency with this relay: every
read (up to ``READ_BYTES``) is stamped on arrival and written out once
``delay`` has passed; bytes in flight per direction are bounded by
``max_buffered`` (beyond it the relay stops reading, so TCP's backpressure
still reaches the sender). Bandwidth is shaped elsewhere (``tc`` in netlab).

In process::

    relay = DelayRelay(("127.0.0.1", 0), ("10.0.0.1", 7481), rtt_s=0.020)
    await relay.start(); relay.port; ...; await relay.close()

As a process (inside a network namespace, see netlab.NetLab.start_relay)::

    python -m kvstore.benchmarks.relay --listen 10.0.0.1:9000 --target 127.0.0.1:7481 --rtt-ms 20

prints one JSON line ``{"port": ..., "pid": ...}`` once it listens and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence

READ_BYTES = 1 << 20
MAX_BUFFERED = 32 << 20


class _Pipe:
    """One direction of one connection: read, stamp, hold for ``delay_s``, write."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                 max_buffered: int) -> None:
        self.reader, self.writer, self.delay_s = reader, writer, delay_s
        self.max_buffered = max_buffered
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(READ_BYTES)
                self.queue.append((loop.time() + self.delay_s, data))
                self.ready.set()
                if not data:
                    return
                self.buffered += len(data)
                if self.buffered >= self.max_buffered:
                    self.room.clear()
        except (ConnectionError, OSError):
            self.queue.append((loop.time(), b""))
            self.ready.set()

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.ready.wait()
                due, data = self.queue.popleft()
                if not self.queue:
                    self.ready.clear()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                await self.writer.drain()
                self.buffered -= len(data)
                if self.buffered < self.max_buffered:
                    self.room.set()
        except (ConnectionError, OSError):
            return


class DelayRelay:
    """Listens on ``listen`` and relays each connection to ``target``, each way delayed by ``rtt_s / 2``."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], rtt_s: float = 0.020,
                 max_buffered: int = MAX_BUFFERED) -> None:
        if rtt_s < 0:
            raise ValueError("rtt_s must be >= 0")
        self.listen, self.target, self.rtt_s, self.max_buffered = listen, target, rtt_s, max_buffered
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            self._tasks.discard(task)
            return
        half = self.rtt_s / 2
        up = _Pipe(c_reader, s_writer, half, self.max_buffered)
        down = _Pipe(s_reader, c_writer, half, self.max_buffered)
        try:
            await asyncio.gather(up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())
        finally:
            for w in (c_writer, s_writer):
                w.close()
            self._tasks.discard(task)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    relay = DelayRelay(_address(args.listen), _address(args.target), args.rtt_ms / 1000.0)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"port": relay.port, "pid": os.getpid()}), flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await relay.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore.benchmarks.relay", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="host:port to listen on (port 0: a free one)")
    p.add_argument("--target", required=True, help="host:port to relay to")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time added (half each way)")
    asyncio.run(_serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
