"""``kvstore migrate``: move a namespace's chunks (or a key list) from one daemon to another.

    kvstore migrate --source http://127.0.0.1:7482 --token ADMIN_OR_TENANT_TOKEN \\
        --peer kvstore://10.0.0.2:7481 --peer-token TENANT_TOKEN --namespace NS_HEX --all

The source daemon pushes the chunks (its admin API starts the transfer); the
command follows its progress with a bar on a terminal, or one plain line per
10% elsewhere, and exits 0 when every chunk arrived, 1 when the transfer
failed (an unreachable peer, a refused token, chunks that kept arriving
corrupt), 2 for bad input (unknown namespace, bad token on the source, bad
arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TextIO

from kvstore.client.admin import AdminClient, TransferStatus
from kvstore.errors import InvalidInput, KVStoreError, RemoteUnavailable, UnknownNamespace
from kvstore.service.protocol import Forbidden, Unauthorized

BAR = 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="admin URL of the daemon holding the chunks (http://host:port)")
    p.add_argument("--token", default=os.environ.get("KVSTORE_SOURCE_TOKEN"),
                   help="bearer token for the source's admin API (default: $KVSTORE_SOURCE_TOKEN; "
                        "the environment keeps it out of the process list)")
    p.add_argument("--peer", required=True, help="data-plane URL of the destination (kvstore:// or kvstores://)")
    p.add_argument("--peer-token", default=os.environ.get("KVSTORE_PEER_TOKEN"),
                   help="bearer token for the destination, the namespace's tenant (default: $KVSTORE_PEER_TOKEN)")
    p.add_argument("--namespace", required=True, help="namespace id (64 hex digits)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every chunk of the namespace the source holds")
    which.add_argument("--keys", default=None, help="comma-separated hex chunk keys")
    which.add_argument("--keys-file", type=Path, default=None, help="file with one hex chunk key per line")
    p.add_argument("--deadline-s", type=float, default=None, help="target duration; the planner picks codecs for it")
    p.add_argument("--codec", default="raw", help="raw (default), auto (bandwidth-aware), or one codec label")
    p.add_argument("--tls", action="store_true", help="speak TLS to the destination")
    p.add_argument("--window", type=int, default=4, help="chunks in flight")
    p.add_argument("--poll-s", type=float, default=0.2, help="progress poll interval")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up following after this long")


def _keys(args: argparse.Namespace) -> list[str] | None:
    if args.keys is not None:
        keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    elif args.keys_file is not None:
        try:
            keys = [line.strip() for line in args.keys_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise InvalidInput(f"cannot read --keys-file: {exc}") from None
    else:
        return None
    if not keys:
        raise InvalidInput("no keys given")
    return keys


class Progress:
    """A bar redrawn in place on a terminal; plain lines at each further 10% elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last_decile = -1

    def show(self, s: TransferStatus) -> None:
        frac = s.fraction
        rate = f"{s.estimate_bytes_per_s / 1e6:.1f} MB/s" if s.estimate_bytes_per_s else "-"
        text = (f"{s.chunks_done + s.chunks_skipped}/{s.chunks_total} chunks, "
                f"{s.bytes_sent / 1e6:.1f} MB sent, link {rate}, {s.state}")  # fmt: skip
        if self.tty:
            filled = int(frac * BAR)
            self.out.write(f"\r[{'#' * filled}{'.' * (BAR - filled)}] {frac:6.1%} {text}\x1b[K")
            self.out.flush()
            return
        decile = int(frac * 10)
        if decile > self._last_decile or s.finished:
            self._last_decile = decile
            print(f"{frac:6.1%} {text}", file=self.out, flush=True)

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")


async def migrate(args: argparse.Namespace, out: TextIO) -> int:
    keys = _keys(args)
    bar = Progress(out)
    async with AdminClient(args.source, token=args.token) as admin:
        status = await admin.start_transfer(
            args.peer, args.namespace, keys=keys, all_chunks=args.all, peer_token=args.peer_token,
            deadline_s=args.deadline_s, codec=args.codec, tls=args.tls, window=args.window,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout_s
        while True:
            bar.show(status)
            if status.finished or loop.time() > deadline:
                break
            await asyncio.sleep(args.poll_s)
            status = await admin.transfer(status.id)
    bar.end()
    if status.state == "done" and not status.raw.get("chunks_missing"):
        codecs = ", ".join(f"{k} x{v}" for k, v in sorted(status.raw.get("codecs", {}).items()))
        print(f"migrated {status.chunks_done} chunks ({status.chunks_skipped} already there) "
              f"in {status.raw.get('elapsed_s', 0):.2f} s; codecs: {codecs or '-'}", file=out)  # fmt: skip
        return 0
    reason = status.error or f"transfer {status.state}"
    print(f"kvstore migrate: error: transfer {status.id} {status.state}: {reason}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(migrate(args, sys.stdout))
    except (InvalidInput, UnknownNamespace, Unauthorized, Forbidden) as exc:
        print(f"kvstore migrate: error: {exc}", file=sys.stderr)
        return 2
    except (RemoteUnavailable, KVStoreError) as exc:
        print(f"kvstore migrate: error: {exc}", file=sys.stderr)
        return 1
