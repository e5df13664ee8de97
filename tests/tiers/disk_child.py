"""A second process for the disk tier tests (run as a script, never imported by pytest).

``write PATH SYNC START``: open a DiskTier and put chunk START, START+1, ...
forever (the test kills it with SIGKILL). Chunk i's key and bytes derive from
i alone (:func:`chunk_key`, :func:`chunk_bytes`), so the parent can check
every chunk it finds.

``tamper PATH MAP_SIZE WRITEMAP OP...``: open the LMDB environment directly,
as another process would, and corrupt records while the tier has it open.
Each OP is ``flip:KEY:DB:OFFSET``, ``truncate:KEY:LEN``, ``copy:SRC:DST`` or
``drop:KEY:DB`` with keys in hex and DB ``hdr`` or ``data``.
"""

from __future__ import annotations

import sys
from typing import Literal

import numpy as np
import numpy.typing as npt

CAPACITY = 3 << 20
MAX_CHUNK = 300_000


def chunk_key(i: int) -> bytes:
    return b"disk-crash-test\x00" + i.to_bytes(16, "big")


def chunk_bytes(i: int) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, int(rng.integers(1, MAX_CHUNK)), dtype=np.uint8)


def write(path: str, sync: Literal["none", "commit"], start: int) -> None:
    from kvstore.keys import ChunkKey, NamespaceId
    from kvstore.tiers.base import ChunkMeta
    from kvstore.tiers.disk import DiskTier, DiskTierConfig

    tier = DiskTier(DiskTierConfig(path, CAPACITY, sync=sync, max_chunk_bytes=MAX_CHUNK))
    ns = NamespaceId(bytes(32))
    i = start
    while True:
        data = chunk_bytes(i)
        tier.put(ChunkKey(chunk_key(i)), data, ChunkMeta(ns, data.size, b""))
        if i == start:
            print("ready", flush=True)
        i += 1


def tamper(path: str, map_size: int, writemap: bool, ops: list[str]) -> None:
    import lmdb

    env = lmdb.open(path, map_size=map_size, max_dbs=3, writemap=writemap)
    dbs = {"hdr": env.open_db(b"hdr"), "data": env.open_db(b"data")}
    for op in ops:
        name, *args = op.split(":")
        with env.begin(write=True) as txn:
            if name == "flip":
                key, db, off = bytes.fromhex(args[0]), dbs[args[1]], int(args[2])
                value = bytearray(txn.get(key, db=db) or b"")
                value[off] ^= 0xFF
                txn.put(key, bytes(value), db=db)
            elif name == "truncate":
                key = bytes.fromhex(args[0])
                txn.put(key, (txn.get(key, db=dbs["data"]) or b"")[: int(args[1])], db=dbs["data"])
            elif name == "copy":
                src, dst = bytes.fromhex(args[0]), bytes.fromhex(args[1])
                for db in dbs.values():
                    txn.put(dst, txn.get(src, db=db) or b"", db=db)
            elif name == "drop":
                txn.delete(bytes.fromhex(args[0]), db=dbs[args[1]])
            else:
                raise SystemExit(f"unknown op {op!r}")
    env.close()


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], "commit" if sys.argv[3] == "commit" else "none", int(sys.argv[4]))
    else:
        tamper(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5:])
