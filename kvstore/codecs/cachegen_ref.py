"""Pure-Python reference of the CacheGen tables and range coder (docs/codecs.md, cachegen).

Slow (about a microsecond per symbol would be optimistic): it exists to pin
the byte format down in readable code and to check the C coder
(``kvstore._rangecoder``) and the CUDA kernels against it on small inputs.
Profile building uses :func:`normalize` too, where speed does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.codecs.cachegen_params import FREQ_TOTAL, QMAX
from kvstore.errors import CodecError

TOP = 1 << 24
MASK32 = 0xFFFFFFFF


def normalize(counts: Sequence[int]) -> list[int]:
    """16-bit frequencies (summing to 65536) of ``counts`` (>= 2 entries, both ends non-zero).

    ``floor(c * 65536 / N)``, raised to 1 where ``c > 0``, then the first
    largest count takes the remainder (it stays >= 2, see the doc).
    """
    total = sum(counts)
    top = max(range(len(counts)), key=lambda i: (counts[i], -i))
    freqs = [0 if c == 0 else max(1, c * FREQ_TOTAL // total) for c in counts]
    freqs[top] += FREQ_TOTAL - sum(freqs)
    return freqs


@dataclass(frozen=True, slots=True)
class Table:
    """One channel's table: symbols ``lo .. lo+n-1`` with frequencies ``freqs`` (``[65536]`` when n = 1)."""

    lo: int
    freqs: tuple[int, ...]

    @property
    def cum(self) -> list[int]:
        out = [0]
        for f in self.freqs:
            out.append(out[-1] + f)
        return out


def table_of(symbols: Sequence[int]) -> Table:
    """The inline table the encoder writes for a channel's symbols."""
    if not symbols:
        return Table(QMAX, (FREQ_TOTAL,))
    lo, hi = min(symbols), max(symbols)
    if lo == hi:
        return Table(lo, (FREQ_TOTAL,))
    counts = [0] * (hi - lo + 1)
    for s in symbols:
        counts[s - lo] += 1
    return Table(lo, tuple(normalize(counts)))


def serialize_tables(tables: Sequence[Table]) -> tuple[bytes, bytes, bytes]:
    """The ``tab_lo``, ``tab_n`` and ``tab_freq`` sections of inline tables."""
    freq = bytearray()
    for t in tables:
        if len(t.freqs) > 1:
            for f in t.freqs:
                freq += f.to_bytes(2, "little")
    return bytes(t.lo for t in tables), bytes(len(t.freqs) for t in tables), bytes(freq)


class Encoder:
    """The byte-wise range encoder: 33-bit ``low`` with a carry, a cached byte and pending 0xFF bytes."""

    def __init__(self) -> None:
        self.low, self.range, self.cache, self.cache_size = 0, MASK32, 0, 1
        self.out = bytearray()
        self.first = True

    def _put(self, byte: int) -> None:
        if self.first:  # always 0: the decoder starts at the second byte
            self.first = False
            return
        self.out.append(byte)

    def _shift_low(self) -> None:
        if self.low < 0xFF000000 or self.low > MASK32:
            carry, temp = self.low >> 32, self.cache
            while True:
                self._put((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if self.cache_size == 0:
                    break
            self.cache = (self.low >> 24) & 0xFF
        self.cache_size += 1
        self.low = (self.low & 0x00FFFFFF) << 8

    def encode(self, cum: int, freq: int) -> None:
        r = self.range >> 16
        self.low += r * cum
        self.range = self.range - r * cum if cum + freq == FREQ_TOTAL else r * freq
        while self.range < TOP:
            self.range = (self.range << 8) & MASK32
            self._shift_low()

    def finish(self) -> bytes:
        for _ in range(5):
            self._shift_low()
        return bytes(self.out)


class Decoder:
    """The matching decoder; :meth:`check_end` says whether the stream was consumed exactly."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.range, self.code, self.bad = data, 0, MASK32, 0, False
        for _ in range(4):
            self.code = (self.code << 8) | self._next()

    def _next(self) -> int:
        byte = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return byte

    def decode(self, table: Table) -> int:
        cum = table.cum
        r = self.range >> 16
        v = min(self.code // r, FREQ_TOTAL - 1)
        i = 0
        while cum[i + 1] <= v:
            i += 1
        self.code -= r * cum[i]
        self.range = self.range - r * cum[i] if cum[i + 1] == FREQ_TOTAL else r * (cum[i + 1] - cum[i])
        self.bad |= self.code >= self.range
        while self.range < TOP:
            self.range = (self.range << 8) & MASK32
            self.code = ((self.code << 8) | self._next()) & MASK32
        return table.lo + i

    def check_end(self) -> None:
        if self.bad or self.pos != len(self.data):
            raise CodecError("cachegen stream is corrupt (reference decoder)")


def _stream_channels(j: int, channels: int, group: int) -> tuple[int, range]:
    per_slab = -(-channels // group)
    slab, c0 = divmod(j, per_slab)
    return slab, range(c0 * group, min((c0 + 1) * group, channels))


def encode_streams(
    symbols: bytes, slabs: int, tokens_q: int, channels: int, group: int, tables: Sequence[Table]
) -> tuple[bytes, bytes]:
    """(``offsets``, ``streams``) sections: stream ``j`` codes its channels token by token."""
    offsets, data = bytearray(), bytearray()
    for j in range(slabs * -(-channels // group)):
        slab, chans = _stream_channels(j, channels, group)
        enc = Encoder()
        for t in range(tokens_q):
            for c in chans:
                table = tables[slab * channels + c]
                i = symbols[(slab * tokens_q + t) * channels + c] - table.lo
                enc.encode(table.cum[i], table.freqs[i])
        data += enc.finish()
        offsets += len(data).to_bytes(4, "little")
    return bytes(offsets), bytes(data)


def decode_streams(
    offsets: bytes, data: bytes, slabs: int, tokens_q: int, channels: int, group: int, tables: Sequence[Table]
) -> bytes:
    """The symbols ``[slabs, tokens_q, channels]`` of :func:`encode_streams` output."""
    out = bytearray(slabs * tokens_q * channels)
    start = 0
    for j in range(slabs * -(-channels // group)):
        end = int.from_bytes(offsets[4 * j : 4 * j + 4], "little")
        slab, chans = _stream_channels(j, channels, group)
        dec = Decoder(data[start:end])
        for t in range(tokens_q):
            for c in chans:
                out[(slab * tokens_q + t) * channels + c] = dec.decode(tables[slab * channels + c])
        dec.check_end()
        start = end
    return bytes(out)


def symbols_of_channel(symbols: bytes, slab: int, channel: int, tokens_q: int, channels: int) -> list[int]:
    """One channel's symbols out of the ``[slabs, tokens_q, channels]`` symbol array."""
    base = slab * tokens_q * channels + channel
    return [symbols[base + t * channels] for t in range(tokens_q)]
