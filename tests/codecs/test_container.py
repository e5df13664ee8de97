"""Container format: byte layout as docs/codecs.md specifies it, strict validation, inspect."""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import xxhash

import kvstore.codecs  # noqa: F401  # registers the codecs
from kvstore.codecs import inspect as kv_inspect
from kvstore.codecs.base import MAX_DECODED_BYTES, ChunkLayout, make_codec
from kvstore.codecs.container import (
    ALIGN,
    MAX_HEADER_BYTES,
    pack,
    spec_from_dict,
    spec_to_dict,
    unpack,
    unpack_for,
)
from kvstore.errors import CodecError, InvalidInput
from kvstore.spec import KVSpec, ModelFingerprint, Shard

SPEC = KVSpec(ModelFingerprint("org/model", "rev"), 2, 2, 8, "bfloat16", shard=Shard(1, 2, 0, 1))
LAYOUT = ChunkLayout(SPEC, 16)


# -- an independent reader/writer of the byte layout in docs/codecs.md --------------------------------


def split(buf: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The header map and the section payloads of a well-formed container, read by hand."""
    magic, version, hlen, hsum = struct.unpack_from("<4sHIQ", buf, 0)
    assert (magic, version) == (b"KVC1", 1)
    blob = buf[18 : 18 + hlen]
    assert xxhash.xxh3_64_intdigest(blob) == hsum
    header = msgpack.unpackb(blob, raw=False)
    payloads = [buf[s["offset"] : s["offset"] + s["length"]] for s in header["sections"]]
    return header, payloads


def assemble(header: Any, payloads: list[bytes], *, place: bool = True) -> bytes:
    """A container of ``header`` (any msgpack value) and ``payloads`` at canonical offsets.

    With ``place``, well-formed section entries get their canonical offsets
    written into the header first (a fixed point, as the writer does).
    """
    for _ in range(8):
        blob = msgpack.packb(header, use_bin_type=True)
        pos, offsets = 18 + len(blob), []
        for p in payloads:
            pos = -(-pos // ALIGN) * ALIGN
            offsets.append(pos)
            pos += len(p)
        entries = header.get("sections") if isinstance(header, dict) else None
        if not place or not isinstance(entries, list):
            break
        changed = False
        for entry, off in zip(entries, offsets):
            if isinstance(entry, dict) and "offset" in entry and entry["offset"] != off:
                entry["offset"], changed = off, True
        if not changed:
            break
    out = bytearray(struct.pack("<4sHIQ", b"KVC1", 1, len(blob), xxhash.xxh3_64_intdigest(blob)) + blob)
    for off, p in zip(offsets, payloads):
        out += bytes(off - len(out)) + p
    return bytes(out)


def sample(codec: str = "raw") -> bytes:
    rng = np.random.default_rng(0)
    return pack(codec, {"level": 3}, LAYOUT, [("a", rng.integers(0, 256, 100, dtype=np.uint8)), ("b", b"xyz")])


# -- round trips and layout -------------------------------------------------------------------------


def test_pack_unpack_round_trip_and_byte_layout() -> None:
    a = np.arange(100, dtype=np.uint8)
    buf = pack("raw", {"level": 3, "flag": True, "name": "x", "f": 0.5}, LAYOUT, [("a", a), ("b", b"xyz")])
    c = unpack(buf)
    assert (c.version, c.codec, c.num_tokens, c.dtype, c.shape) == (1, "raw", 16, "bfloat16", (2, 2, 16, 2, 8))
    assert dict(c.params) == {"level": 3, "flag": True, "name": "x", "f": 0.5}
    assert c.layout == LAYOUT and c.spec == SPEC
    assert bytes(c.section("a")) == a.tobytes() and bytes(c.section("b")) == b"xyz"
    assert [s.name for s in c.sections] == ["a", "b"] and all(s.offset % ALIGN == 0 for s in c.sections)
    assert c.nbytes == len(buf) == c.sections[-1].offset + 3
    header, payloads = split(buf)  # the independent reader agrees
    assert set(header) == {"codec", "params", "spec", "num_tokens", "dtype", "shape", "sections"}
    assert header["spec"] == spec_to_dict(SPEC) and header["shape"] == [2, 2, 16, 2, 8]
    assert payloads == [a.tobytes(), b"xyz"]
    assert [s["xxh3"] for s in header["sections"]] == [xxhash.xxh3_64_intdigest(p) for p in payloads]
    assert assemble(header, payloads) == buf  # and the independent writer writes the same bytes
    with pytest.raises(CodecError, match="no section"):
        c.section("zzz")


DOC_VECTOR = (
    "4b5643310100f10000004a1774b2741a393d87a5636f646563a3726177a6706172616d7380a4737065638ba56d6f64656c"
    "a16da87265766973696f6ea0aa6e756d5f6c617965727301ac6e756d5f6b765f686561647301a8686561645f64696d02a5"
    "6474797065a862666c6f61743136a66c61796f7574ab6b765f7365706172617465a774705f72616e6b00a774705f73697a"
    "6501a770705f72616e6b00a770705f73697a6501aa6e756d5f746f6b656e7301a56474797065a862666c6f61743136a573"
    "68617065950102010102a873656374696f6e739184a46e616d65a464617461a66f6666736574cd0140a66c656e67746808"
    "a478786833cf95f8f54ad5370f8f" + "00" * 61 + "803f00c0003f4040"
)


def test_docs_example_is_what_raw_writes() -> None:
    lay = ChunkLayout(KVSpec(ModelFingerprint("m"), 1, 1, 2, "bfloat16"), 1)
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.bfloat16)
    buf = make_codec("raw").encode(x.view(torch.uint8).numpy(), lay)
    assert buf.hex() == DOC_VECTOR and len(buf) == 328
    header, payloads = split(buf)
    assert header["sections"] == [{"name": "data", "offset": 320, "length": 8, "xxh3": 10806657007629045647}]
    assert xxhash.xxh3_64_intdigest(payloads[0]) == 10806657007629045647


def test_section_views_share_the_buffer_and_memoryview_inputs_work() -> None:
    buf = bytearray(sample())
    c = unpack(memoryview(buf))
    assert c.section("b").obj is not None and bytes(c.section("b")) == b"xyz"
    assert unpack(np.frombuffer(bytes(buf), dtype=np.uint8)).codec == "raw"


def test_spec_dict_round_trip_and_validation() -> None:
    for spec in [SPEC, KVSpec(ModelFingerprint("m"), 3, 1, 576, "float32", "mla_latent")]:
        assert spec_from_dict(spec_to_dict(spec)) == spec
    good = spec_to_dict(SPEC)
    bad_values: list[tuple[str, object]] = [
        ("num_layers", 0), ("num_layers", True), ("num_layers", 1.0), ("num_layers", 1 << 40), ("head_dim", "8"),
        ("dtype", "bfloat17"), ("layout", "paged"), ("model", ""), ("model", 7), ("tp_rank", 2), ("pp_size", 0),
    ]
    for key, value in bad_values:
        with pytest.raises(CodecError):
            spec_from_dict({**good, key: value})
    with pytest.raises(CodecError, match="unknown fields"):
        spec_from_dict({**good, "extra": 1})
    with pytest.raises(CodecError, match="missing fields"):
        spec_from_dict({k: v for k, v in good.items() if k != "dtype"})
    with pytest.raises(CodecError):
        spec_from_dict([1, 2])
    with pytest.raises(CodecError):  # MLA has one kv head
        spec_from_dict({**spec_to_dict(KVSpec(ModelFingerprint("m"), 3, 1, 576, layout="mla_latent")), "num_kv_heads": 2})


def test_pack_refuses_bad_requests() -> None:
    with pytest.raises(InvalidInput):
        pack("raw", {}, LAYOUT, [])
    with pytest.raises(InvalidInput):
        pack("raw", {}, LAYOUT, [("a", b"1"), ("a", b"2")])
    with pytest.raises(InvalidInput):
        pack("raw", {"bad": None}, LAYOUT, [("a", b"1")])  # type: ignore[dict-item]
    with pytest.raises(InvalidInput):
        pack("", {}, LAYOUT, [("a", b"1")])
    huge = ChunkLayout(KVSpec(ModelFingerprint("m"), 1 << 10, 1 << 10, 1 << 10), 2)
    with pytest.raises(InvalidInput):
        pack("raw", {}, huge, [("a", b"1")])


# -- validation of hostile containers ---------------------------------------------------------------


def _with_header(edit: Any) -> bytes:
    header, payloads = split(sample())
    edit(header)
    return assemble(header, payloads)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.update(codec=5), "codec must be a string"),
        (lambda h: h.update(extra=1), "unknown fields"),
        (lambda h: h.pop("shape"), "missing fields"),
        (lambda h: h.update(num_tokens=0), "num_tokens"),
        (lambda h: h.update(num_tokens=True), "num_tokens"),
        (lambda h: h.update(num_tokens=1 << 40), "num_tokens"),
        (lambda h: h.update(num_tokens=17), "shape"),
        (lambda h: h.update(dtype="float16"), "dtype"),
        (lambda h: h.update(shape=[2, 2, 16, 2]), "shape"),
        (lambda h: h.update(shape=[2, 2, 16.0, 2, 8]), "shape"),
        (lambda h: h.update(params={"x": None}), "param x"),
        (lambda h: h.update(params={"x": float("nan")}), "param x"),
        (lambda h: h.update(params=[1]), "params"),
        (lambda h: h.update(sections=[]), "sections"),
        (lambda h: h["sections"][0].update(name=""), "name"),
        (lambda h: h["sections"][1].update(name="a"), "duplicate"),
        (lambda h: h["sections"][0].update(length=101), "checksum mismatch"),  # eats a padding byte
        (lambda h: h["sections"][0].update(length=200), "misplaced"),
        (lambda h: h["sections"][0].update(length=-1), "length"),
        (lambda h: h["sections"][0].update(xxh3=-1), "xxh3"),
        (lambda h: h["sections"][0].update(xxh3=h["sections"][0]["xxh3"] ^ 1), "checksum mismatch"),
        (lambda h: h["sections"][0].pop("xxh3"), "missing fields"),
        (lambda h: h["spec"].update(num_layers=1 << 30), "spec.num_layers"),
    ],
)
def test_header_fields_are_validated(edit: Any, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        unpack(_with_header(edit))


def test_section_offsets_must_be_canonical() -> None:
    header, payloads = split(sample())
    for offset in [0, header["sections"][0]["offset"] + 1, header["sections"][0]["offset"] + ALIGN, 1 << 40]:
        header["sections"][0]["offset"] = offset
        with pytest.raises(CodecError, match="offset|misplaced"):
            unpack(assemble(header, payloads, place=False))


def test_claimed_size_is_bounded_before_anything_is_allocated() -> None:
    spec = KVSpec(ModelFingerprint("m"), 1024, 64, 1024, "float32")  # 512 MiB per token
    def edit(h: dict[str, Any]) -> None:
        h.update(spec=spec_to_dict(spec), num_tokens=8, dtype="float32", shape=list(spec.chunk_shape(8)))
    assert spec.chunk_nbytes(8) > MAX_DECODED_BYTES
    with pytest.raises(CodecError, match="decoded bytes"):
        unpack(_with_header(edit))


def test_prefix_padding_and_length_are_checked() -> None:
    buf = sample()
    cases = {
        "magic": b"KVC2" + buf[4:],
        "version": buf[:4] + struct.pack("<H", 2) + buf[6:],
        "header length": buf[:6] + struct.pack("<I", MAX_HEADER_BYTES + 1) + buf[10:],
        "header checksum": buf[:10] + bytes(8) + buf[18:],
        "after its last": buf + b"\0",
        "padding": buf[: c_end(buf)] + b"\1" + buf[c_end(buf) + 1 :],
        "shorter": buf[:10],
    }
    for message, bad in cases.items():
        with pytest.raises(CodecError, match=message):
            unpack(bad)
    assert unpack(buf, verify=False).codec == "raw"


def c_end(buf: bytes) -> int:
    """End of the header: the first padding byte."""
    return 18 + int(struct.unpack_from("<I", buf, 6)[0])


def test_msgpack_limits() -> None:
    _, payloads = split(sample())
    for blob in [b"\x91" * 3000 + b"\x01", b"\x81\xa1a" * 2000 + b"\x01"]:  # nested 3000 / 2000 deep
        buf = struct.pack("<4sHIQ", b"KVC1", 1, len(blob), xxhash.xxh3_64_intdigest(blob)) + blob
        with pytest.raises(CodecError, match="malformed"):
            unpack(buf)
    for header in [{"codec": "x" * 5000}, {"codec": b"bytes"}, msgpack.ExtType(1, b"x"), list(range(100)),
                   {str(i): i for i in range(100)}, {1: 2}, "just a string"]:
        with pytest.raises(CodecError):
            unpack(assemble(header, payloads, place=False))
    blob = msgpack.packb({"a": 1}) + b"\xc1"  # trailing garbage after the map
    buf = struct.pack("<4sHIQ", b"KVC1", 1, len(blob), xxhash.xxh3_64_intdigest(blob)) + blob
    with pytest.raises(CodecError):
        unpack(buf)


def test_unpack_for_checks_the_codec() -> None:
    with pytest.raises(CodecError, match="written by codec 'raw'"):
        unpack_for(sample(), "lossless")
    with pytest.raises(CodecError):
        unpack(12345)  # type: ignore[arg-type]


# -- kvstore inspect --------------------------------------------------------------------------------


def _container() -> bytes:
    raw = torch.randn(LAYOUT.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).view(-1)
    return make_codec("quant", {"bits": 4, "group": "kivi"}).encode(raw.view(torch.uint8).numpy(), LAYOUT)


def test_describe_reports_header_sections_and_ratio() -> None:
    buf = _container()
    d = kv_inspect.describe(buf, decode=True)
    assert d["magic"] == "KVC1" and d["version"] == 1 and d["codec"] == "quant"
    assert d["params"] == {"bits": 4, "format": "int", "group": "kivi", "group_size": 128, "scale_dtype": "float16"}
    assert d["spec"] == spec_to_dict(SPEC) and d["shape"] == list(LAYOUT.shape) and d["num_tokens"] == 16
    assert d["raw_bytes"] == LAYOUT.nbytes and d["container_bytes"] == len(buf)
    assert d["ratio"] == pytest.approx(LAYOUT.nbytes / len(buf))
    assert [s["name"] for s in d["sections"]] == ["codes", "scale", "zero"]  # type: ignore[attr-defined]
    assert d["checksums_ok"] is True and str(d["decode"]).startswith("ok")
    json.dumps(d)
    bad = bytearray(buf)
    bad[-1] ^= 0xFF
    d = kv_inspect.describe(bytes(bad), decode=True)
    assert d["checksums_ok"] is False and str(d["decode"]).startswith("failed")
    assert [s["ok"] for s in d["sections"]] == [True, True, False]  # type: ignore[attr-defined]


def _run(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    kv_inspect.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr = out, err
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        rc = kv_inspect.run(parser.parse_args(argv))
    finally:
        sys.stdout, sys.stderr, sys.stdin = old
    return rc, out.getvalue(), err.getvalue()


def test_inspect_command(tmp_path: Path) -> None:
    buf = _container()
    path = tmp_path / "chunk.kvc"
    path.write_bytes(buf)
    rc, out, _ = _run([str(path), "--decode"])
    assert rc == 0
    for text in ["KVC1", "version 1", "quant", "bits=4", "group=kivi", "org/model @ rev", "layers=2", "kv_heads=2",
                 "head_dim=8", "bfloat16", "kv_separate", "tp1/2", "(2, 2, 16, 2, 8)", "ratio", "codes", "scale",
                 "zero", " ok", "decode     ok"]:
        assert text in out, text
    rc, out, _ = _run(["-", "--json"], stdin=buf)
    assert rc == 0 and json.loads(out)["codec"] == "quant"
    path.write_bytes(buf[:-1] + bytes([buf[-1] ^ 1]))
    rc, out, _ = _run([str(path)])
    assert rc == 1 and "CHECKSUM MISMATCH" in out
    path.write_bytes(b"not a container at all")
    rc, _, err = _run([str(path)])
    assert rc == 1 and "not a valid container" in err and "magic" in err
    rc, _, err = _run([str(tmp_path / "missing")])
    assert rc == 2 and "cannot read" in err
