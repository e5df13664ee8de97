"""The ``kvstore`` command: ``serve`` and ``bench``.

Only this module turns flags and environment variables into configuration
objects; everything below it takes validated config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from kvstore.errors import KVStoreError
from kvstore.sizes import parse_size


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"KVSTORE_{name}", default)


def _add_serve(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("serve", help="run the daemon (HTTP on loopback)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (loopback only) [KVSTORE_HOST]")
    p.add_argument("--port", type=int, default=int(_env("PORT", "7480") or 7480), help="port [KVSTORE_PORT]")
    p.add_argument("--data-dir", default=_env("DATA_DIR", "./kvstore-data"),
                   help="disk tier directory [KVSTORE_DATA_DIR]")
    p.add_argument("--no-disk", action="store_true", help="run without the disk tier")
    p.add_argument("--cpu-bytes", default=_env("CPU_BYTES", "1GiB"), help="CPU tier budget [KVSTORE_CPU_BYTES]")
    p.add_argument("--disk-bytes", default=_env("DISK_BYTES", "8GiB"), help="disk tier budget [KVSTORE_DISK_BYTES]")
    p.add_argument("--disk-sync", choices=["none", "commit"], default=_env("DISK_SYNC", "none"))
    p.add_argument("--redis-url", default=_env("REDIS_URL", None), help="remote tier URL [KVSTORE_REDIS_URL]")
    p.add_argument("--redis-cluster", action="store_true", help="the Redis URL names a cluster node")
    p.add_argument("--redis-bytes", default=_env("REDIS_BYTES", "8GiB"))
    p.add_argument("--policy", default=_env("POLICY", "lru"), help="eviction policy: lru, lfu, cost, ttl")
    p.add_argument("--write-mode", choices=["write_through", "write_back"], default="write_through")


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from kvstore.builder import TiersConfig
    from kvstore.service.http import check_bind, make_app

    check_bind(args.host)
    tiers = TiersConfig(
        cpu_bytes=parse_size(args.cpu_bytes),
        policy=args.policy,
        data_dir=None if args.no_disk else args.data_dir,
        disk_bytes=parse_size(args.disk_bytes),
        disk_sync=args.disk_sync,
        redis_url=args.redis_url,
        redis_cluster=args.redis_cluster,
        redis_bytes=parse_size(args.redis_bytes),
        write_mode=args.write_mode,
    )
    logging.basicConfig(level=logging.INFO, format='{"ts":"%(asctime)s","level":"%(levelname)s","msg":"%(message)s"}')
    web.run_app(make_app(tiers), host=args.host, port=args.port, print=lambda m: print(m, flush=True))
    return 0


def _add_bench(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from kvstore.benchmarks import store as store_bench

    p = sub.add_parser("bench", help="benchmarks that report ratios against baselines measured in the same run")
    which = p.add_subparsers(dest="bench", required=True)
    sp = which.add_parser("store", help="tiers, lookup and index against memcpy, files, redis-py and sha256")
    store_bench.add_arguments(sp)
    sp.set_defaults(bench_run=store_bench.run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache store for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return int(args.bench_run(args))
    except (KVStoreError, ValueError) as e:
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
