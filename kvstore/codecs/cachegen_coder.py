"""The CPU side of cachegen: chunk bytes <-> named sections, through the C coder.

Sections, in container order (sizes for ``N = slabs * channels`` tables,
``S`` streams, ``E`` exact tokens, ``itemsize`` of the chunk's dtype):

- ``qparams``  zstd frame of ``N`` u16le bfloat16 means, then ``N`` u16le bfloat16 steps
- ``exact``    ``slabs * E * channels * itemsize`` bytes: the first ``E`` tokens of every slab, verbatim
- ``tab_lo``   zstd frame of ``N`` bytes: lowest symbol of each table
- ``tab_n``    zstd frame of ``N`` bytes: symbols in each table (0: the profile's table)
- ``tab_freq`` zstd frame of the u16le frequencies of the tables with ``n >= 2``, in table order
- ``offsets``  ``S`` u32le: the end of each stream in ``streams``
- ``streams``  the range-coded streams, back to back
- ``tscale``   (format 4 only) zstd frame of ``slabs * tokens_q`` int8 step codes in [-8, 8]: the step
  of (slab, token, channel) is the channel's step times ``bfloat16(2^(code / 4))``

The four metadata sections are zstd frames (level 3, content size written):
their steps are nearly constant per slab and, with a profile, ``tab_lo`` and
``tab_n`` are almost all zeros, which saves about 4% of a 256-token chunk.

The C extension (``kvstore._rangecoder``) raises ValueError on any
inconsistency; here that becomes :class:`InvalidInput` when encoding the
caller's values and :class:`CodecError` when decoding a container.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Final

import numpy as np
import zstandard

from kvstore.buffers import U8, as_u8
from kvstore.codecs import cachegen_rope as rope
from kvstore.codecs.cachegen_params import NUM_SYMBOLS, QMAX, Geometry, QuantPlan
from kvstore.codecs.cachegen_transform import HeadTransform, forward_chunk, inverse_into
from kvstore.codecs.container import SectionData
from kvstore.errors import CodecError, InvalidInput

try:
    from kvstore import _rangecoder as _rc
except ImportError:  # the optional extension was not built (no C compiler at install)
    _rc = None  # type: ignore[assignment]

SECTION_NAMES: Final = ("qparams", "exact", "tab_lo", "tab_n", "tab_freq", "offsets", "streams")
#: format 4's sections: the per-(slab, token) step codes last
SCALED_SECTION_NAMES: Final = (*SECTION_NAMES, "tscale")
#: sections stored as zstd frames
META_SECTIONS: Final = frozenset({"qparams", "tab_lo", "tab_n", "tab_freq", "tscale"})
META_LEVEL: Final = 3
MAX_WINDOW: Final = 1 << 23
#: (lo, n, freq) bytes of a profile's tables, or None
ProfileTables = tuple[bytes, bytes, bytes] | None
#: largest magnitude of a format 4 step code (steps scale by 1/4 .. 4)
MAX_TCODE: Final = 8
Buffer = U8 | bytes | memoryview


def rangecoder() -> ModuleType:
    """The compiled coder.

    Raises:
        CodecError: it was not built (install with a C compiler: ``pip install -e .``).
    """
    if _rc is None:
        raise CodecError("cachegen needs the C extension kvstore._rangecoder (reinstall with a C compiler)")
    return _rc


def available() -> bool:
    return _rc is not None


def section_names(token_scale: bool) -> tuple[str, ...]:
    """The sections of a container, in order (format 4 has ``tscale``)."""
    return SCALED_SECTION_NAMES if token_scale else SECTION_NAMES


def token_codes(raw: Buffer, g: Geometry) -> bytes:
    """Format 4's step code of every (slab, quantized token), from the chunk's values as stored.

    ``n`` = the sum over KV heads of the head vector's L2 norm (float64, in order), ``c =
    round(4 log2 n)`` (rounded against fixed thresholds, no log taken), and the code is ``c`` minus
    the rounded mean of ``c`` over the slab's tokens, clipped to [-8, 8] (0 for an all-zero token):
    a token whose values are small (those attention piles onto) gets a finer step, and the code does
    not depend on where the chunk sits in a sequence.

    Raises:
        InvalidInput: NaN or infinite values.
    """
    try:
        codes: bytes = rangecoder().token_codes(raw, g.dtype_code, g.slabs, g.tokens, g.channels, g.exact, g.heads)
    except ValueError as exc:
        raise InvalidInput(f"cachegen cannot encode this chunk: {exc}") from None
    return codes


@dataclass(frozen=True, slots=True)
class Quantized:
    """A chunk's quantization: ``qparams`` section, symbols ``[slabs, tokens_q, channels]`` and tables."""

    qparams: bytes
    symbols: bytes
    lo: bytes
    n: bytes
    freq: bytes


def quantize_chunk(
    raw: Buffer, g: Geometry, plan: QuantPlan, profile: ProfileTables, tscale: bytes | None = None
) -> Quantized:
    """Means, steps, symbols and tables of a chunk (tables defer to ``profile`` where it covers them;
    steps scaled per (slab, token) by ``tscale``'s codes when given).

    Raises:
        InvalidInput: NaN/infinite values, or values too large for bfloat16 steps.
    """
    rc = rangecoder()
    plo, pn = (profile[0], profile[1]) if profile else (None, None)
    try:
        geo = (g.dtype_code, g.slabs, g.tokens, g.channels, g.exact)
        qp = rc.quant_params(raw, *geo, plan.targets.tobytes(), tscale)
        sym, lo, n, freq = rc.quantize(raw, *geo, qp, plan.rounding, plo, pn, tscale)
    except ValueError as exc:
        raise InvalidInput(f"cachegen cannot encode this chunk: {exc}") from None
    return Quantized(qp, sym, lo, n, freq)


def exact_rows(raw: U8, g: Geometry) -> U8:
    """The first ``g.exact`` tokens of every slab, as bytes ``[slabs, exact, channels * itemsize]``."""
    rows = raw.reshape(g.slabs, g.tokens, g.channels * g.itemsize)
    return np.ascontiguousarray(rows[:, : g.exact]).reshape(-1)


def encode_sections(
    raw: U8,
    g: Geometry,
    group: int,
    plan: QuantPlan,
    profile: ProfileTables,
    rope_theta: float = 0.0,
    transform: HeadTransform | None = None,
    token_scale: bool = False,
) -> list[tuple[str, SectionData]]:
    """Every section of a chunk, in :func:`section_names` order (keys un-rotated first when
    ``rope_theta`` applies, see :mod:`cachegen_rope`; values quantized as the components of
    ``transform`` when given, see :mod:`cachegen_transform`; steps scaled per (slab, token) with
    ``token_scale``, see :func:`token_codes`).

    Raises:
        InvalidInput: the chunk's values cannot be encoded (see :func:`quantize_chunk`).
    """
    ts = token_codes(raw, g) if token_scale else None
    if transform is not None:
        q = quantize_chunk(forward_chunk(raw, g, rope_theta, transform), g.as_float32(), plan, profile, ts)
    elif rope.applies(g, rope_theta):
        q = quantize_chunk(rope.unrotated(raw, g, rope_theta), g.as_float32(), plan, profile, ts)
    else:
        q = quantize_chunk(raw, g, plan, profile, ts)
    p = profile or (None, None, None)
    try:
        offsets, streams = rangecoder().encode_streams(
            q.symbols, g.slabs, g.tokens_q, g.channels, group, q.lo, q.n, q.freq, *p
        )
    except ValueError as exc:  # unreachable: quantize only emits symbols its tables hold
        raise CodecError(f"cachegen encoder: {exc}") from None
    values: list[SectionData] = [q.qparams, exact_rows(raw, g), q.lo, q.n, q.freq, offsets, streams]
    if ts is not None:
        values.append(ts)
    return pack_sections(dict(zip(section_names(ts is not None), values)))


def pack_sections(values: Mapping[str, SectionData]) -> list[tuple[str, SectionData]]:
    """The sections in container order (format 4's when ``values`` has ``tscale``), the metadata ones
    (:data:`META_SECTIONS`) as zstd frames."""
    zstd = zstandard.ZstdCompressor(level=META_LEVEL, write_content_size=True)
    names = section_names("tscale" in values)
    return [(n, zstd.compress(as_u8(values[n]).data) if n in META_SECTIONS else values[n]) for n in names]


def _unzstd(frame: memoryview, name: str, sizes: range) -> bytes:
    """A metadata section's bytes; CodecError unless its frame declares and holds a size in ``sizes``."""
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in sizes:
            raise CodecError(f"cachegen section {name} declares {declared} bytes, outside {sizes}")
        data = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompress(
            frame, max_output_size=declared
        )
    except zstandard.ZstdError as exc:
        raise CodecError(f"cachegen section {name}: corrupt zstd frame: {exc}") from None
    if len(data) != declared:
        raise CodecError(f"cachegen section {name} decoded to {len(data)} bytes, declared {declared}")
    return data


def open_sections(
    sections: Mapping[str, memoryview], g: Geometry, group: int
) -> dict[str, bytes | memoryview]:
    """The sections with the metadata decompressed, every size checked against the geometry.

    Raises:
        CodecError: a corrupt frame or a section of the wrong size.
    """
    n = g.num_channels
    exact = {"qparams": 4 * n, "tab_lo": n, "tab_n": n}
    out: dict[str, bytes | memoryview] = {
        k: _unzstd(sections[k], k, range(v, v + 1)) for k, v in exact.items()
    }
    out["tab_freq"] = _unzstd(sections["tab_freq"], "tab_freq", range(0, 2 * NUM_SYMBOLS * n + 1, 2))
    fixed = {"exact": g.slabs * g.exact * g.channels * g.itemsize, "offsets": 4 * g.num_streams(group)}
    for name, size in fixed.items():
        if len(sections[name]) != size:
            raise CodecError(f"cachegen section {name} holds {len(sections[name])} bytes, expected {size}")
        out[name] = sections[name]
    out["streams"] = sections["streams"]
    if "tscale" in sections:
        size = g.slabs * g.tokens_q
        out["tscale"] = _unzstd(sections["tscale"], "tscale", range(size, size + 1))
        codes = np.frombuffer(out["tscale"], np.int8)
        if codes.size and (codes.min() < -MAX_TCODE or codes.max() > MAX_TCODE):
            raise CodecError(f"cachegen section tscale holds codes outside [-{MAX_TCODE}, {MAX_TCODE}]")
    return out


def live_components(s: Mapping[str, bytes | memoryview]) -> bytes:
    """One byte per (slab, channel): 0 where the channel holds one value over the chunk's tokens (its
    inline table has one symbol, and with step codes that symbol is the mean's), else 1."""
    live = np.frombuffer(s["tab_n"], np.uint8) != 1
    if "tscale" in s:
        live |= np.frombuffer(s["tab_lo"], np.uint8) != QMAX
    out: bytes = live.astype(np.uint8).tobytes()
    return out


def decode_sections(
    sections: Mapping[str, memoryview],
    g: Geometry,
    group: int,
    profile: ProfileTables,
    target: U8,
    rope_theta: float = 0.0,
    transform: HeadTransform | None = None,
) -> None:
    """Decode a chunk's sections into ``target`` (exactly the chunk's bytes), through the inverse of
    ``transform`` when the chunk was encoded with one.

    Raises:
        CodecError: a section of the wrong size, a corrupt table, stream table or stream.
    """
    s = open_sections(sections, g, group)
    p = profile or (None, None, None)
    rotated = rope.applies(g, rope_theta) or transform is not None
    values = np.empty(g.slabs * g.tokens * g.channels * 4, np.uint8) if rotated else target
    try:
        rangecoder().decode_chunk(
            s["streams"],
            s["offsets"],
            g.slabs,
            g.tokens,
            g.channels,
            g.exact,
            group,
            s["tab_lo"],
            s["tab_n"],
            s["tab_freq"],
            *p,
            s["qparams"],
            2 if rotated else g.dtype_code,
            values,
            s.get("tscale"),
        )
    except ValueError as exc:
        raise CodecError(f"cachegen: {exc}") from None
    if transform is not None:
        inverse_into(values, target, g, rope_theta, transform, live_components(s))
    elif rotated:
        rope.rotate_into(values, target, g, rope_theta)
    if g.exact:
        rows = target.reshape(g.slabs, g.tokens, g.channels * g.itemsize)
        rows[:, : g.exact] = np.frombuffer(s["exact"], np.uint8).reshape(g.slabs, g.exact, -1)
