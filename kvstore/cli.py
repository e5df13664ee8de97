"""The ``kvstore`` command: ``serve`` and ``bench``.

Only this module turns flags and environment variables into configuration
objects; everything below it takes validated config.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from kvstore.errors import KVStoreError


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvstore.service.config_load import CONFIG_ENV, OPTIONS, TOKENS_ENV, dest

    p = sub.add_parser(
        "serve",
        help="run the daemon: data plane + admin HTTP API (loopback unless auth tokens are set)",
        description="Settings come from flags > KVSTORE_* environment > --config file > defaults "
        f"(docs/daemon.md). Tokens: --tokens-file or {TOKENS_ENV}=token:tenant,...",
    )
    p.add_argument("--config", help=f"TOML (or YAML) config file [{CONFIG_ENV}]")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config (redacted) and exit"
    )
    p.add_argument("--no-disk", action="store_true", help="run without the disk tier (same as --data-dir '')")
    for o in OPTIONS:
        if o.flag is None:
            continue
        if o.boolean:
            p.add_argument(
                o.flag,
                dest=dest(o),
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{o.help} [{o.env}]",
            )
        else:
            p.add_argument(
                o.flag, dest=dest(o), default=None, metavar=o.name.upper(), help=f"{o.help} [{o.env}]"
            )


def _serve(args: argparse.Namespace) -> int:
    import json

    from kvstore.service.config_load import load_config
    from kvstore.service.daemon import run

    flags = dict(vars(args))
    if args.no_disk:
        flags["tiers__data_dir"] = ""
    config = load_config(os.environ, flags, args.config)
    if args.print_config:
        print(json.dumps(config.redacted(), indent=2))
        return 0
    return run(config)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser], load: bool) -> None:
    """The ``bench`` command; its modules are imported only when it runs (``load``), so that a
    benchmark's imports never stand between ``kvstore serve`` and its start."""
    p = sub.add_parser(
        "bench", help="benchmarks that report ratios against baselines measured in the same run"
    )
    which = p.add_subparsers(dest="bench", required=True)
    if not load:
        return
    from kvstore.benchmarks import store as store_bench

    sp = which.add_parser("store", help="tiers, lookup and index against memcpy, files, redis-py and sha256")
    store_bench.add_arguments(sp)
    sp.set_defaults(bench_run=store_bench.run)
    from kvstore.benchmarks import codecs as codecs_bench

    cp = which.add_parser(
        "codecs", help="every codec and level on real SmolLM2 KV: size, speed against zstd -1, quality"
    )
    codecs_bench.add_arguments(cp)
    cp.set_defaults(bench_run=codecs_bench.run)
    if importlib.util.find_spec("kvstore.benchmarks.service") is not None:
        service_bench = importlib.import_module("kvstore.benchmarks.service")
        sv = which.add_parser("service", help="the daemon's data plane and client against raw sockets")
        service_bench.add_arguments(sv)
        sv.set_defaults(bench_run=service_bench.run)
    from kvstore.benchmarks import ttft as ttft_bench

    tt = which.add_parser(
        "ttft", help="time to first token on the real model: a cached prefix (CPU, disk, daemon) vs full prefill"
    )
    ttft_bench.add_arguments(tt)
    tt.set_defaults(bench_run=ttft_bench.run)
    from kvstore.benchmarks import blend as blend_bench

    bl = which.add_parser(
        "blend", help="CacheBlend passage reuse on the real model: quality and TTFT per ratio vs full prefill"
    )
    blend_bench.add_arguments(bl)
    bl.set_defaults(bench_run=blend_bench.run)
    from kvstore.benchmarks import migrate as migrate_bench

    mg = which.add_parser(
        "migrate", help="KV transfers between daemons over shaped, delayed links: raw vs chosen codec, deadlines"
    )
    migrate_bench.add_arguments(mg)
    mg.set_defaults(bench_run=migrate_bench.run)
    from kvstore.benchmarks import gpu as gpu_bench

    gp = which.add_parser(
        "gpu", help="GPU tier transfers and CUDA kernels against d2d and pinned-copy ceilings of the same run"
    )
    gpu_bench.add_arguments(gp)
    gp.set_defaults(bench_run=gpu_bench.run)


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvstore.codecs import inspect as inspect_cmd

    p = sub.add_parser("inspect", help="print a codec container's header, sections and checks")
    inspect_cmd.add_arguments(p)
    p.set_defaults(command_run=inspect_cmd.run)


def _add_migrate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kvstore.service.migration import transfer_cli

    p = sub.add_parser("migrate", help="move a namespace's chunks from one daemon to another (progress bar)")
    transfer_cli.add_arguments(p)
    p.set_defaults(command_run=transfer_cli.run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache store for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    _add_serve(sub)
    _add_bench(sub, load=bool(argv) and argv[0] == "bench")
    _add_inspect(sub)
    _add_migrate(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command in ("inspect", "migrate"):
            return int(args.command_run(args))
        return int(args.bench_run(args))
    except (KVStoreError, ValueError) as e:
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
