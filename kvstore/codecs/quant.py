"""The ``quant`` codec: int8 / int4 / int2 groups with a scale and zero point, or fp8 e4m3.

Integer formats are asymmetric: a group with minimum ``m`` and maximum ``M``
stores ``zero <= m`` and ``scale >= (M - zero) / (2**bits - 1)`` (rounded
outward when stored as float16, so the group's range is always covered) and
codes ``q = round((x - zero) / scale)``; decoding is ``q * scale + zero``,
so every element is off by at most ``scale / 2`` before the final rounding
to the spec's dtype. int4 packs two codes per byte, int2 four (element
``i`` of each byte's run in bits ``bits*i``). ``e4m3`` is symmetric:
``scale = amax / 448`` and codes are float8 e4m3fn bytes (as
``torch.float8_e4m3fn``). Groups are described in ``quant_groups.py``; the
arithmetic is numpy (``quant_floats.py`` says why).

The first ``exact_tokens`` tokens of a chunk (default 1 for int8: the
attention sink at a sequence start) are stored verbatim and the groups
cover the rest, as a chunk of their own. int8 defaults to KIVI groups
(docs/codecs.md, "int8 defaults", has the measurements).

Sections: ``codes`` (packed codes), ``scale`` and, for integer formats,
``zero`` (little-endian float16 or float32, as ``scale_dtype`` says), then
with ``exact_tokens > 0`` ``exact`` (those tokens' bytes, slab by slab).
Invariants: encoder and decoder derive every size from (layout, params); a
section of any other length is a :class:`CodecError`; only float KV
(float32, float16, bfloat16) with finite values is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, CodecParams, register_codec
from kvstore.codecs.container import Container, input_bytes, output_bytes, pack, unpack_for
from kvstore.codecs.quant_floats import (
    E4M3_VALUES,
    F32,
    FP8_MAX,
    bf16_to_f32,
    f32_to_bf16,
    f32_to_e4m3,
    round_f16,
)
from kvstore.codecs.quant_groups import Group, Segment, layer_numel, part_views, plan
from kvstore.errors import CodecError, InvalidInput

Format = Literal["int", "e4m3"]
ScaleDType = Literal["float16", "float32"]
#: float16 scales and zero points are used only while every group bound stays below this
FP16_SAFE: Final = 32768.0
MAX_GROUP_SIZE: Final = 1 << 16
#: how decoded values are written: bfloat16 as its uint16 bit patterns
_OUT_NP: dict[str, np.dtype[np.generic]] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")
}
_SCALE_NP: dict[str, np.dtype[np.floating]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
#: int8's defaults: see docs/codecs.md ("quant", int8 defaults) for the measurements behind them
INT8_DEFAULT_GROUP: Final = "kivi"
INT8_DEFAULT_EXACT_TOKENS: Final = 1
_KEYS = frozenset({"bits", "format", "group", "group_size", "scale_dtype", "exact_tokens"})
#: upper bound of ``exact_tokens`` (a chunk shorter than it is stored verbatim)
MAX_EXACT_TOKENS: Final = 1 << 16


def default_group(fmt: str, bits: object) -> str:
    """The ``group`` a codec gets when its params name none."""
    if fmt == "e4m3":
        return "tensor"
    return INT8_DEFAULT_GROUP if bits == 8 else "token"


def default_exact_tokens(fmt: str, bits: object) -> int:
    """The ``exact_tokens`` a codec gets when its params name none (containers without the key: 0)."""
    return INT8_DEFAULT_EXACT_TOKENS if fmt == "int" and bits == 8 else 0


@dataclass(frozen=True, slots=True)
class QuantParams:
    """Validated quant parameters; :meth:`as_dict` is what a container stores.

    Invariants: ``bits`` in {8, 4, 2}; ``e4m3`` only with 8 bits;
    ``1 <= group_size <= MAX_GROUP_SIZE``; ``0 <= exact_tokens <= MAX_EXACT_TOKENS``.
    """

    bits: int = 8
    format: Format = "int"
    group: Group = "token"
    group_size: int = 128
    scale_dtype: ScaleDType = "float16"
    exact_tokens: int = 0

    @classmethod
    def parse(cls, params: CodecParams, error: type[Exception], *, stored: bool = False) -> QuantParams:
        """Check ``params`` (missing keys take defaults: :func:`default_group`,
        :func:`default_exact_tokens`; a ``stored`` container's missing ``exact_tokens`` is 0, as
        containers written before the key existed, and ones with 0, omit it).

        Raises:
            error: an unknown key, or a value of the wrong type or out of range.
        """
        unknown = set(params) - _KEYS
        if unknown:
            raise error(f"quant takes {sorted(_KEYS)}, got unknown {sorted(unknown)}")
        fmt, bits = params.get("format", "int"), params.get("bits", 8)
        group = params.get("group", default_group(str(fmt), bits))
        size, sdt = params.get("group_size", 128), params.get("scale_dtype", "float16")
        exact = params.get("exact_tokens", 0 if stored else default_exact_tokens(str(fmt), bits))
        if fmt not in get_args(Format) or group not in get_args(Group) or sdt not in get_args(ScaleDType):
            raise error(f"quant format/group/scale_dtype {fmt!r}/{group!r}/{sdt!r} unknown")
        if type(bits) is not int or bits not in (8, 4, 2) or (fmt == "e4m3" and bits != 8):
            raise error(f"quant bits must be 8, 4 or 2 (8 for e4m3), got {bits!r}")
        if type(size) is not int or not 1 <= size <= MAX_GROUP_SIZE:
            raise error(f"quant group_size must be an int in [1, {MAX_GROUP_SIZE}], got {size!r}")
        if type(exact) is not int or not 0 <= exact <= MAX_EXACT_TOKENS:
            raise error(f"quant exact_tokens must be an int in [0, {MAX_EXACT_TOKENS}], got {exact!r}")
        return cls(bits, fmt, group, size, sdt, exact)  # type: ignore[arg-type]  # checked against get_args

    def as_dict(self) -> dict[str, int | float | str | bool]:
        """The params a container stores (``exact_tokens`` only when > 0: such containers read as before)."""
        out: dict[str, int | float | str | bool] = {
            "bits": self.bits, "format": self.format, "group": self.group,
            "group_size": self.group_size, "scale_dtype": self.scale_dtype,
        }  # fmt: skip
        if self.exact_tokens:
            out["exact_tokens"] = self.exact_tokens
        return out

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True, slots=True)
class Sizes:
    """Byte sizes of the sections for one (layout, params)."""

    numel: int
    num_groups: int
    codes: int
    scale: int


def _plan(layout: ChunkLayout, p: QuantParams) -> list[Segment]:
    """The segments of one layer of ``layout``'s quantized tokens (none for zero tokens)."""
    return plan(layout, p.group, p.group_size) if layout.num_tokens else []


def sizes(layout: ChunkLayout, p: QuantParams) -> Sizes:
    """Section sizes of the quantized tokens, ``layout`` being those tokens (see :func:`split_exact`)."""
    segments = _plan(layout, p)
    layers = layout.spec.num_layers
    numel = layers * sum(s.numel for s in segments)
    groups = layers * sum(s.num_groups for s in segments)
    return Sizes(numel, groups, -(-numel * p.bits // 8), groups * _SCALE_NP[p.scale_dtype].itemsize)


def split_exact(layout: ChunkLayout, p: QuantParams) -> tuple[int, ChunkLayout]:
    """(tokens stored verbatim: the first ``exact_tokens``, at most all; the layout of the rest)."""
    exact = min(p.exact_tokens, layout.num_tokens)
    return exact, ChunkLayout(layout.spec, layout.num_tokens - exact)


def _slabs(flat: U8, layout: ChunkLayout) -> U8:
    """Chunk bytes as ``[layers * kv_factor, tokens, bytes of one token in one slab]`` (a view)."""
    spec = layout.spec
    rows = spec.num_layers * spec.kv_factor
    return flat.reshape(rows, layout.num_tokens, spec.bytes_per_token // rows)


def _check_finite(raw: U8, dtype: str, error: type[Exception]) -> None:
    if raw.size and not np.isfinite(_to_float32(raw, dtype)).all():
        raise error("quant: exact tokens must be finite (found NaN or infinity)")


class _NeedFloat32(Exception):
    """A group bound does not fit float16 scales: encode again with float32 ones."""


def _check_bounds(bound: F32, p: QuantParams) -> None:
    """Refuse NaN/infinity; ask for float32 scales when float16 ones would overflow."""
    top = float(bound.max()) if bound.size else 0.0
    if not np.isfinite(top):
        raise InvalidInput("quant codec needs finite KV values (found NaN or infinity)")
    if p.scale_dtype == "float16" and top >= FP16_SAFE:
        raise _NeedFloat32


def _encode_segment(g: F32, seg: Segment, p: QuantParams, codes: U8) -> tuple[F32, ...]:
    """Write one segment's codes into ``codes``; return its scales (and zero points), float32."""
    axis = seg.reduce_dim
    if p.format == "e4m3":
        amax = np.abs(g).max(axis=axis, keepdims=True) / np.float32(FP8_MAX)
        _check_bounds(amax, p)
        scale = amax if p.scale_dtype == "float32" else round_f16(amax, up=True)
        scale[scale == 0] = 1
        t = g / scale
        np.clip(t, -FP8_MAX, FP8_MAX, out=t)
        codes[:] = f32_to_e4m3(t).reshape(-1)
        return (scale,)
    lo, hi = g.min(axis=axis, keepdims=True), g.max(axis=axis, keepdims=True)
    _check_bounds(np.maximum(np.abs(lo), np.abs(hi)), p)
    if p.scale_dtype == "float32":
        zero, scale = lo, (hi - lo) / np.float32(p.qmax)
    else:
        zero = round_f16(lo, up=False)
        scale = round_f16((hi - zero) / np.float32(p.qmax), up=True)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    t = g - zero
    t *= inv
    np.rint(t, out=t)
    np.clip(t, 0, p.qmax, out=t)
    np.copyto(codes, t.reshape(-1), casting="unsafe")
    return scale, zero


def _to_float32(raw: U8, dtype: str) -> F32:
    """A new float32 array of the values in ``raw``."""
    if dtype == "bfloat16":
        return bf16_to_f32(raw.view("<u2"))
    return raw.view("<f2" if dtype == "float16" else "<f4").astype(np.float32)


def _encode(data: U8, layout: ChunkLayout, p: QuantParams) -> list[tuple[str, U8]]:
    """The sections of a chunk, quantized layer by layer.

    Raises:
        _NeedFloat32: ``p`` asks for float16 scales and a group bound does not fit.
    """
    segments = _plan(layout, p)
    layers, per_layer = layout.spec.num_layers, layout.nbytes // layout.spec.num_layers
    want = sizes(layout, p)
    codes = np.empty(want.numel, dtype=np.uint8)
    stats = np.empty((2, want.num_groups), dtype=np.float32)
    cpos = gpos = 0
    for layer in range(layers if segments else 0):
        values = _to_float32(data[layer * per_layer : (layer + 1) * per_layer], layout.spec.dtype)
        parts = part_views(values, layout)
        for seg in segments:
            g = seg.grouped(parts[seg.part]).astype(np.float32, copy=False)
            out = _encode_segment(g, seg, p, codes[cpos : cpos + seg.numel])
            for i, stat in enumerate(out):
                stats[i, gpos : gpos + seg.num_groups] = stat.reshape(-1)
            cpos, gpos = cpos + seg.numel, gpos + seg.num_groups
    sdt = _SCALE_NP[p.scale_dtype]
    names = ["scale", "zero"] if p.format == "int" else ["scale"]
    sections = [("codes", _pack(codes, p.bits))]
    return sections + [(name, stats[i].astype(sdt).view(np.uint8)) for i, name in enumerate(names)]


def _pack(codes: U8, bits: int) -> U8:
    per = 8 // bits
    if per == 1:
        return codes
    padded = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    runs = padded.reshape(-1, per)
    out = runs[:, 0].copy()
    for i in range(1, per):
        out |= runs[:, i] << np.uint8(bits * i)
    return out


def _unpack(packed: U8, bits: int, numel: int) -> U8:
    per = 8 // bits
    if per == 1:
        return packed
    out = np.empty((packed.size, per), dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    for i in range(per):
        np.bitwise_and(packed >> np.uint8(bits * i), mask, out=out[:, i])
    return out.reshape(-1)[:numel]


def _stats(c: Container, name: str, p: QuantParams, n: int) -> F32:
    """Section ``name`` (scales or zero points) as ``n`` finite float32 values.

    Raises:
        CodecError: the wrong length, or a value the encoder never writes (NaN, infinity).
    """
    raw = c.section(name)
    if len(raw) != n * _SCALE_NP[p.scale_dtype].itemsize:
        raise CodecError(f"quant section {name!r} holds {len(raw)} bytes, expected {n} values")
    values = np.frombuffer(raw, dtype=_SCALE_NP[p.scale_dtype]).astype(np.float32)
    if not np.isfinite(values).all():
        raise CodecError(f"quant section {name!r} holds non-finite values")
    return values


def _check_sections(c: Container, p: QuantParams, layout: ChunkLayout) -> Sizes:
    """The sizes of the quantized tokens (``layout``), the sections checked against them."""
    want = sizes(layout, p)
    names = ["codes", "scale", "zero"] if p.format == "int" else ["codes", "scale"]
    names += ["exact"] if p.exact_tokens else []
    if [s.name for s in c.sections] != names or len(c.section("codes")) != want.codes:
        raise CodecError(f"quant container sections {[s.name for s in c.sections]} do not match {names}"
                         f" with {want.codes} code bytes")
    return want


def _store(y: F32, dst: npt.NDArray[np.generic], dtype: str) -> None:
    """Write float32 values into a view of the output in the spec's dtype (bfloat16 as uint16 bits)."""
    dst[...] = f32_to_bf16(y) if dtype == "bfloat16" else y


def _decode(c: Container, p: QuantParams, target: U8) -> None:
    """Decode ``c`` into ``target`` (exactly the chunk's bytes): the exact tokens copied, the rest
    dequantized (in place when there are no exact tokens, else through a buffer)."""
    exact, layout = split_exact(c.layout, p)
    want = _check_sections(c, p, layout)
    if p.exact_tokens:
        head = np.frombuffer(c.section("exact"), dtype=np.uint8)
        if head.size != exact * c.spec.bytes_per_token:
            raise CodecError(f"quant section 'exact' holds {head.size} bytes, expected {exact} tokens")
        _check_finite(head, c.dtype, CodecError)
    if not exact:
        _dequantize(c, p, layout, want, target)
        return
    tail = np.empty(layout.nbytes, dtype=np.uint8)
    _dequantize(c, p, layout, want, tail)
    slabs = _slabs(target, c.layout)
    slabs[:, :exact] = _slabs(head, ChunkLayout(c.spec, exact))
    slabs[:, exact:] = _slabs(tail, layout)


def _dequantize(c: Container, p: QuantParams, layout: ChunkLayout, want: Sizes, target: U8) -> None:
    """Dequantize the quantized tokens of ``c`` (``layout``) layer by layer into ``target``."""
    scales = _stats(c, "scale", p, want.num_groups)
    zeros = _stats(c, "zero", p, want.num_groups) if p.format == "int" else None
    codes = _unpack(np.frombuffer(c.section("codes"), dtype=np.uint8), p.bits, want.numel)
    segments = _plan(layout, p)
    view = target.view(_OUT_NP[c.dtype])
    per_layer = layer_numel(layout)
    cpos = gpos = 0
    for layer in range(c.spec.num_layers if segments else 0):
        parts = part_views(view[layer * per_layer : (layer + 1) * per_layer], layout)
        for seg in segments:
            q = codes[cpos : cpos + seg.numel].reshape(seg.grouped_shape)
            scale = scales[gpos : gpos + seg.num_groups].reshape(seg.stats_shape)
            if zeros is None:
                y = E4M3_VALUES[q]
                y *= scale
            else:
                y = q * scale  # float32: uint8 * float32
                y += zeros[gpos : gpos + seg.num_groups].reshape(seg.stats_shape)
            dst = seg.slice(parts[seg.part])
            _store(y.reshape(dst.shape), dst, c.dtype)
            cpos, gpos = cpos + seg.numel, gpos + seg.num_groups


class QuantCodec(Codec):
    """Group quantization. Params: ``bits`` (8/4/2), ``format`` (``int``/``e4m3``),
    ``group`` (``token``/``channel``/``kivi``/``tensor``; int8 default ``kivi``), ``group_size``
    (default 128), ``scale_dtype`` (``float16``/``float32``; float16 becomes float32 for chunks with
    |x| >= 32768), ``exact_tokens`` (leading tokens stored verbatim; int8 default 1, else 0).
    """

    name: ClassVar[str] = "quant"
    lossless: ClassVar[bool] = False

    def __init__(self, params: CodecParams | None = None) -> None:
        super().__init__(params)
        self.quant = QuantParams.parse(self.params, InvalidInput)
        self.params = self.quant.as_dict()

    def encode(self, raw: U8, layout: ChunkLayout) -> bytes:
        """Quantize a float chunk into ``codes``, ``scale`` (and ``zero``) sections.

        Raises:
            InvalidInput: wrong size, a non-float dtype, or NaN/infinite values.
        """
        data = input_bytes(raw, layout)
        if layout.spec.dtype not in _OUT_NP:
            raise InvalidInput(f"quant encodes float32/float16/bfloat16 KV, not {layout.spec.dtype}")
        p = self.quant
        exact, rest = split_exact(layout, p)
        extra: list[tuple[str, U8]] = []
        if p.exact_tokens:
            slabs = _slabs(data, layout)
            head = np.ascontiguousarray(slabs[:, :exact]).reshape(-1)
            _check_finite(head, layout.spec.dtype, InvalidInput)
            extra = [("exact", head)]
            data = np.ascontiguousarray(slabs[:, exact:]).reshape(-1)
        try:
            sections = _encode(data, rest, p)
        except _NeedFloat32:
            p = replace(p, scale_dtype="float32")
            sections = _encode(data, rest, p)
        return pack(self.name, p.as_dict(), layout, [*sections, *extra])

    def decode_into(self, container: bytes | memoryview | U8, out: U8) -> ChunkLayout:
        """Dequantize into ``out`` in the spec's dtype.

        Raises:
            CodecError: malformed, corrupt, not a quant container, bad params, or wrong section sizes.
            InvalidInput: ``out`` is too small.
        """
        c = unpack_for(container, self.name)
        p = QuantParams.parse(c.params, CodecError, stored=True)
        if c.dtype not in _OUT_NP:
            raise CodecError(f"quant container claims dtype {c.dtype}, which quant never writes")
        with np.errstate(over="ignore", invalid="ignore"):  # hostile scales may overflow: inf, not a warning
            _decode(c, p, output_bytes(out, c.layout))
        return c.layout


register_codec(QuantCodec.name, QuantCodec)
