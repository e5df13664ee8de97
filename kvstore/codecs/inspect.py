"""``kvstore inspect FILE``: what a container holds, and whether it is intact.

:func:`inspect_container` parses a container (without trusting it) and
reports its header, its sections with their checksum status and its
compression ratio against the raw chunk; :func:`describe` gives the same as
a JSON-able dict and :func:`format_text` renders it for a terminal.
``add_arguments`` / ``run`` plug the command into ``kvstore.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from kvstore.buffers import U8
from kvstore.codecs.base import codec_names, make_codec
from kvstore.codecs.container import MAGIC, spec_to_dict, unpack
from kvstore.errors import CodecError, KVStoreError

#: a container file larger than this is refused before reading (containers are chunk-sized)
MAX_FILE_BYTES = (1 << 31) + (1 << 24)

@dataclass(frozen=True, slots=True)
class SectionInfo:
    name: str
    offset: int
    length: int
    xxh3: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Description:
    """What ``kvstore inspect`` reports about one container.

    ``ratio`` is the raw chunk's bytes over the container's bytes (header and
    padding included); ``decode`` is None unless a decode was asked for.
    """

    version: int
    codec: str
    params: dict[str, int | float | str | bool]
    spec: dict[str, str | int]
    num_tokens: int
    dtype: str
    shape: tuple[int, ...]
    container_bytes: int
    header_bytes: int
    raw_bytes: int
    sections: tuple[SectionInfo, ...]
    decode: str | None = None
    magic: str = MAGIC.decode("ascii")

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.container_bytes

    @property
    def checksums_ok(self) -> bool:
        return all(s.ok for s in self.sections)

    def to_dict(self) -> dict[str, object]:
        fields = asdict(self)
        out: dict[str, object] = {"magic": fields.pop("magic")}
        out.update(fields)
        out.update(shape=list(self.shape), sections=list(fields["sections"]), ratio=self.ratio,
                   checksums_ok=self.checksums_ok)
        return out


def inspect_container(buf: bytes | memoryview | U8, *, decode: bool = False) -> Description:
    """Parse a container without trusting it and describe it.

    Args:
        buf: the container bytes.
        decode: also decode it with its codec (when registered) and report the outcome.

    Raises:
        CodecError: the prefix or header is malformed (section checksums are reported, not raised).
    """
    c = unpack(buf, verify=False)
    sections = tuple(
        SectionInfo(s.name, s.offset, s.length, f"{s.xxh3:016x}", c.section_ok(s.name)) for s in c.sections
    )
    return Description(
        version=c.version, codec=c.codec, params=dict(c.params), spec=spec_to_dict(c.spec),
        num_tokens=c.num_tokens, dtype=c.dtype, shape=c.shape, container_bytes=c.nbytes,
        header_bytes=c.header_nbytes, raw_bytes=c.layout.nbytes, sections=sections,
        decode=_try_decode(buf, c.codec, c.layout.nbytes) if decode else None,
    )


def describe(buf: bytes | memoryview | U8, *, decode: bool = False) -> dict[str, object]:
    """:func:`inspect_container` as a JSON-able dict.

    Returns:
        magic, version, codec, params, spec, num_tokens, dtype, shape,
        container_bytes, header_bytes, raw_bytes, ratio, sections (name,
        offset, length, xxh3, ok), checksums_ok and decode.

    Raises:
        CodecError: the prefix or header is malformed.
    """
    return inspect_container(buf, decode=decode).to_dict()


def _try_decode(buf: bytes | memoryview | U8, codec: str, nbytes: int) -> str:
    import kvstore.codecs  # noqa: F401  # registers every codec

    if codec not in codec_names():
        return f"codec {codec!r} is not registered here"
    out = np.empty(nbytes, dtype=np.uint8)
    start = time.perf_counter()
    try:
        make_codec(codec).decode_into(buf, out)
    except KVStoreError as exc:
        return f"failed: {exc}"
    return f"ok ({(time.perf_counter() - start) * 1e3:.1f} ms)"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def format_text(d: Description) -> str:
    """A human-readable rendering of a :class:`Description`."""
    spec = d.spec
    lines = [
        f"magic      {d.magic}  version {d.version}",
        f"codec      {d.codec}  " + " ".join(f"{k}={v}" for k, v in sorted(d.params.items())),
        f"model      {spec['model']}" + (f" @ {spec['revision']}" if spec["revision"] else ""),
        (
            f"spec       layers={spec['num_layers']} kv_heads={spec['num_kv_heads']}"
            f" head_dim={spec['head_dim']}"
            f" dtype={spec['dtype']} layout={spec['layout']}"
            f" shard=tp{spec['tp_rank']}/{spec['tp_size']} pp{spec['pp_rank']}/{spec['pp_size']}"
        ),
        f"chunk      {d.num_tokens} tokens, shape {d.shape}",
        (
            f"size       {_size(d.container_bytes)} container ({d.header_bytes} B prefix+header)"
            f" for {_size(d.raw_bytes)} raw: ratio {d.ratio:.3f}x"
        ),
        "sections",
    ]
    for s in d.sections:
        status = "ok" if s.ok else "CHECKSUM MISMATCH"
        lines.append(f"  {s.name:<12} offset {s.offset:>10}  length {s.length:>10}  xxh3 {s.xxh3}  {status}")
    if d.decode is not None:
        lines.append(f"decode     {d.decode}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kvstore inspect``: FILE (or ``-`` for stdin) or KEY with where to find it."""
    parser.add_argument(
        "file", metavar="FILE|KEY",
        help="a container file, - to read one from stdin, or a chunk key (64 hex digits) with --data-dir "
        "and/or --redis-url",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.add_argument("--decode", action="store_true", help="also decode it with its codec")
    parser.add_argument("--data-dir", help="KEY: look in the disk tier under this directory (read-only)")
    parser.add_argument("--redis-url", help="KEY: look in the remote tier at this Redis/Valkey URL")
    parser.add_argument("--key-prefix", default="kvs:", help="KEY: the remote tier's key prefix (default kvs:)")


def _read(path: str) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise CodecError(f"{path} is larger than any container ({MAX_FILE_BYTES} bytes)")
    return data


def run(args: argparse.Namespace) -> int:
    """Print a container's description.

    Returns:
        0 if the container is intact (and decodes, with ``--decode``), 1 if it
        is malformed or corrupt, 2 if the file cannot be read.
    """
    if args.data_dir is not None or args.redis_url is not None:
        return _run_key(args)
    try:
        data = _read(args.file)
    except OSError as exc:
        print(f"kvstore inspect: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        d = inspect_container(data, decode=args.decode)
    except CodecError as exc:
        print(f"kvstore inspect: {args.file}: not a valid container: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(d.to_dict(), indent=2) if args.json else format_text(d))
    return 0 if d.checksums_ok and (d.decode is None or d.decode.startswith("ok")) else 1


def _run_key(args: argparse.Namespace) -> int:
    """``kvstore inspect KEY``: 0 if every tier's record is intact, 1 if one is not or none exists, 2 on bad input."""
    from kvstore.codecs import inspect_key as ik

    try:
        key = ik.parse_key(args.file)
        found = [
            r
            for r in (
                ik.read_disk(args.data_dir, key, args.decode) if args.data_dir is not None else None,
                ik.read_remote(args.redis_url, key, args.key_prefix, args.decode)
                if args.redis_url is not None
                else None,
            )
            if r is not None
        ]
    except KVStoreError as exc:
        print(f"kvstore inspect: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"kvstore inspect: no record of {args.file} in the tiers named", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.to_dict() for r in found], indent=2))
    ok = True
    for r in found:
        if not args.json:
            print(ik.format_record(r))
            if r.container is not None:
                print(format_text(r.container))
        decode = None if r.container is None else r.container.decode
        ok = ok and r.intact and (decode is None or decode.startswith("ok"))
    return 0 if ok else 1

