"""A data-plane server as a process of its own, for tests and benchmarks.

    python -m kvstore.service.dataplane_main --port 0 --unix-path /tmp/kv.sock --cpu-bytes 256MiB

It builds a store (a CPU tier whose arena lives in /dev/shm unless
``--no-shm``, optionally a second CPU tier below it), serves it, prints one
JSON line ``{"port", "unix_path", "pid", "shm_path"}`` on stdout once it
accepts connections, and on SIGTERM or SIGINT drains, closes the store and
exits 0. The daemon proper (``kvstore serve``) wires the same server into its
aiohttp lifecycle with configuration from flags, environment and TOML.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence

from kvstore.service.dataplane import DataPlaneConfig, make_dataplane
from kvstore.sizes import parse_size
from kvstore.tiers.base import Tier
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore
from kvstore.tiers.store_types import StoreConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvstore.service.dataplane_main", description=__doc__.split("\n")[0]
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (printed)")
    p.add_argument("--unix-path", default=None, help="also serve this Unix socket")
    p.add_argument("--cpu-bytes", default="256MiB", help="CPU tier budget")
    p.add_argument(
        "--lower-cpu-bytes", default=None, help="add a second CPU tier of this size below the first"
    )
    p.add_argument("--no-shm", action="store_true", help="arena in private memory; no shared-memory path")
    p.add_argument(
        "--token", action="append", default=[], metavar="TOKEN=TENANT", help="bearer token (repeatable)"
    )
    p.add_argument("--max-payload", default="1GiB")
    p.add_argument("--max-inflight", default="2GiB")
    p.add_argument("--frame-timeout", type=float, default=30.0)
    p.add_argument("--lease-ttl", type=float, default=30.0)
    return p


def _store(args: argparse.Namespace) -> TieredStore:
    tiers: list[Tier] = [
        CPUTier(
            CPUTierConfig(
                parse_size(args.cpu_bytes), prefault=False, shared_memory=not args.no_shm, pin_memory="never"
            )
        )
    ]
    if args.lower_cpu_bytes:
        tiers.append(
            CPUTier(
                CPUTierConfig(parse_size(args.lower_cpu_bytes), prefault=False, pin_memory="never"),
                name="cpu-lower",
            )
        )
    return TieredStore(tiers, StoreConfig(lease_ttl_s=args.lease_ttl))


def _config(args: argparse.Namespace) -> DataPlaneConfig:
    tokens: dict[str, str] = {}
    for item in args.token:
        token, sep, tenant = item.partition("=")
        if not sep:
            raise SystemExit(f"--token takes TOKEN=TENANT, got {item!r}")
        tokens[token] = tenant
    return DataPlaneConfig(
        host=args.host, port=args.port, unix_path=args.unix_path, tokens=tokens,
        max_payload_bytes=parse_size(args.max_payload), max_inflight_bytes=parse_size(args.max_inflight),
        shm=not args.no_shm, frame_timeout_s=args.frame_timeout,
    )  # fmt: skip


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT; the store is closed on the way out."""
    store = _store(args)
    try:
        server = make_dataplane(store, _config(args))
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        shm_path = getattr(store.top, "shm_path", None)
        print(
            json.dumps(
                {"port": server.port, "unix_path": server.unix_path, "pid": os.getpid(), "shm_path": shm_path}
            ),
            flush=True,
        )
        await stop.wait()
        await server.close(drain_timeout_s=5.0)
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
