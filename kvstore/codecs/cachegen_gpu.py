"""cachegen on a GPU: the kernels of ``kernels/cachegen.cu`` through CuPy, byte-identical to the CPU.

:class:`GpuCoder` runs the whole codec on the device -- statistics, steps,
quantization, tables, one thread per stream to range-code, a gather into one
buffer -- and writes the same container bytes as :class:`CachegenCodec` on the
CPU; decoding runs one thread per stream straight into a device buffer. Host
work is limited to prefix sums of per-channel and per-stream sizes and, when
decoding, the checks of ``cachegen_checks.py`` (before any kernel trusts an
offset). CuPy is an optional dependency (``pip install kvstore[gpu]``),
imported only when a :class:`CupyBackend` is made.

Kernels are plain grid-stride loops, so a backend only has to allocate arrays,
copy them and call a kernel by name over N work items: :class:`CupyBackend`
on a GPU, or a CPU emulation of the same source (tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from kvstore.buffers import U8
from kvstore.codecs import cachegen_rope as rope
from kvstore.codecs.base import ChunkLayout
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_checks import check_qparams, stream_ends, table_offsets
from kvstore.codecs.cachegen_coder import (
    ProfileTables,
    live_components,
    open_sections,
    pack_sections,
    section_names,
)
from kvstore.codecs.cachegen_params import (
    CONTAINER_KEYS,
    DTYPE_CODES,
    CachegenParams,
    Geometry,
    QuantPlan,
)
from kvstore.codecs.cachegen_transform import HeadTransform
from kvstore.codecs.container import Container, SectionData, output_bytes, pack, unpack_for
from kvstore.errors import CodecError, InvalidInput

#: a device array: numpy.ndarray for the CPU emulation, cupy.ndarray on a GPU
Array = Any
#: (have a profile, its lo, n, freq, freq offsets) as kernel arguments
ProfileArrays = tuple[int, Array, Array, Array, Array]
#: (cum, bucket, lo, n) of the tables in force, per table
Cum = tuple[Array, Array, Array, Array]

KERNEL_SOURCE: Final = Path(__file__).with_name("kernels") / "cachegen.cu"
#: argument kinds of each kernel: p pointer (an array), i int32, q int64
SIGNATURES: Final[dict[str, str]] = {
    "cg_stats": "piqqqqppppp",
    "cg_token_norms": "piqqqqqpp",
    "cg_token_codes": "pqqp",
    "cg_tdev": "piqqqqppp",
    "cg_params": "pppppqqqqpppi",
    "cg_quantize": "piqqqqpippi",
    "cg_tables": "pqqqipppppp",
    "cg_compact_freq": "pppqp",
    "cg_build_cum": "ppppippppqpppp",
    "cg_encode": "pqqqqppppppp",
    "cg_gather": "ppppqp",
    "cg_decode": "ppqqqqqppppipipppi",
    "cg_rope": "pipiqqqqqipi",
    "cg_transform": "ppqqqqqppi",
}
_ERRORS: Final = {1: "KV holds NaN or infinite values", 2: "KV values too large for cachegen steps"}


class KernelBackend(Protocol):
    """Arrays and kernel launches: what :class:`GpuCoder` needs from a device."""

    def upload(self, host: np.ndarray) -> Array: ...

    def empty(self, size: int, dtype: type[np.generic]) -> Array: ...

    def download(self, array: Array) -> np.ndarray: ...

    def launch(self, kernel: str, items: int, *args: Array | int) -> None: ...


class CupyBackend:
    """The kernels compiled by NVRTC (``--fmad=false``) on the current CUDA device.

    Raises (at construction):
        CodecError: CuPy is not installed or no CUDA device is usable.
    """

    THREADS: Final = 128

    def __init__(self) -> None:
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001  # ImportError, CUDARuntimeError, driver errors...
            raise CodecError(f"cachegen on a GPU needs CuPy and a CUDA device: {exc}") from None
        self.cp = cupy
        self.module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("--fmad=false", "-std=c++17"))

    def upload(self, host: np.ndarray) -> Array:
        return self.cp.asarray(np.ascontiguousarray(host))

    def empty(self, size: int, dtype: type[np.generic]) -> Array:
        return self.cp.empty(max(size, 1), dtype=dtype)

    def download(self, array: Array) -> np.ndarray:
        return np.asarray(self.cp.asnumpy(array))

    def launch(self, kernel: str, items: int, *args: Array | int) -> None:
        if items <= 0:
            return
        typed = [
            np.int32(a) if k == "i" else np.int64(a) if k == "q" else a
            for k, a in zip(SIGNATURES[kernel], args, strict=True)
        ]
        blocks = min(-(-items // self.THREADS), 65535)
        self.module.get_function(kernel)((blocks,), (self.THREADS,), tuple(typed))


def _exclusive(sizes: np.ndarray) -> np.ndarray:
    out = np.zeros(sizes.size, np.uint64)
    np.cumsum(sizes[:-1], out=out[1:])
    return out


class GpuCoder:
    """Encodes and decodes cachegen containers with the CUDA kernels; same bytes as the CPU.

    Invariants: for every chunk and params, :meth:`encode` returns exactly
    ``codec.encode``'s bytes, and :meth:`decode_into` writes exactly what
    ``codec.decode_into`` writes (tests/codecs/test_cachegen_gpu.py).
    """

    def __init__(self, codec: CachegenCodec, backend: KernelBackend | None = None) -> None:
        """Args: ``codec`` gives the params and profiles; ``backend`` defaults to :class:`CupyBackend`."""
        self.codec = codec
        self.b: KernelBackend = backend if backend is not None else CupyBackend()

    def _profile(
        self, digest: str, g: Geometry, p: CachegenParams | None, error: type[Exception]
    ) -> ProfileTables:
        if not digest:
            return None
        profile = self.codec.profiles.get(digest, error)
        profile.check_fits(g, p, error)
        return profile.lo, profile.n, profile.freq

    def _profile_arrays(self, profile: ProfileTables, count: int) -> ProfileArrays:
        """(have, lo, n, freq, freq offsets) of a profile on the device (1-byte dummies without one)."""
        if profile is None:
            dummy = self.b.upload(np.zeros(1, np.uint8))
            return (
                0,
                dummy,
                dummy,
                self.b.upload(np.zeros(1, np.uint16)),
                self.b.upload(np.zeros(1, np.uint64)),
            )
        offs = table_offsets(profile[0], profile[1], profile[2], count, allow_profile=False)
        lo, n, freq = (
            np.frombuffer(profile[0], np.uint8),
            np.frombuffer(profile[1], np.uint8),
            np.frombuffer(profile[2], "<u2"),
        )
        return 1, self.b.upload(lo), self.b.upload(n), self.b.upload(freq), self.b.upload(offs)

    def encode(self, raw: U8 | Array, layout: ChunkLayout) -> bytes:
        """The container ``self.codec.encode(raw, layout)`` returns, computed on the device.

        Args:
            raw: the chunk's bytes, a flat uint8 host or device array of ``layout.nbytes``.
        Raises:
            InvalidInput: wrong size or dtype, non-finite values, or a profile that does not fit.
        """
        if int(raw.size) != layout.nbytes or layout.spec.dtype not in DTYPE_CODES:
            raise InvalidInput("cachegen on a GPU needs layout.nbytes bytes of float32/float16/bfloat16 KV")
        setup = self.codec.setup(layout)
        if setup.tables is not None:
            table_offsets(*setup.tables, setup.geometry.num_channels, allow_profile=False)
        src = self.b.upload(raw) if isinstance(raw, np.ndarray) else raw
        p = self.codec.config
        sections = self._sections(
            src, setup.geometry, p.group, setup.plan, setup.tables, p.rope_theta, setup.transform, p.token_scale
        )
        return pack(self.codec.name, setup.params, layout, sections)

    def _rope(
        self, src: Array, src_dtype: int, dst: Array, dst_dtype: int, g: Geometry, theta: float, rotate: int
    ) -> None:
        """``cg_rope``: (un)rotate the K slabs of tokens ``g.exact..`` from ``src`` into ``dst``."""
        table = self.b.upload(np.frombuffer(rope.rope_table(g.tokens, g.head_dim, theta), np.float32))
        items = g.slabs * g.tokens_q * g.heads * (g.head_dim // 2)
        geo = (g.slabs, g.tokens, g.exact, g.heads, g.head_dim, g.kv_factor)
        self.b.launch("cg_rope", items, src, src_dtype, dst, dst_dtype, *geo, table, rotate)

    def _to_float32(self, src: Array, g: Geometry, theta: float, rotate: int, dst: Array) -> None:
        """``cg_rope`` between the chunk's dtype and float32 (rotate 0: into float32, keys un-rotated
        where ``theta`` applies; 1: back out of float32 into ``dst`` in the chunk's dtype)."""
        if rope.applies(g, theta):
            sdt, ddt = (2, g.dtype_code) if rotate else (g.dtype_code, 2)
            self._rope(src, sdt, dst, ddt, g, theta, rotate)
            return
        if g.channels % 2:
            raise CodecError("cachegen transforms need an even number of channels")
        table = self.b.upload(np.zeros(2 * g.tokens, np.float32))  # kv_factor 1: nothing rotates
        geo = (g.slabs, g.tokens, g.exact, g.channels // 2, 2, 1)
        sdt, ddt = (2, g.dtype_code) if rotate else (g.dtype_code, 2)
        self.b.launch("cg_rope", g.slabs * g.tokens_q * (g.channels // 2), src, sdt, dst, ddt, *geo, table, 1)

    def _transform(
        self, src: Array, dst: Array, g: Geometry, matrices: bytes, live: np.ndarray | None
    ) -> None:
        """``cg_transform``: ``dst = M @ src`` per (slab, head, token >= g.exact), float32."""
        m = self.b.upload(np.frombuffer(matrices, "<f4"))
        flags = self.b.upload(live if live is not None else np.zeros(1, np.uint8))
        geo = (g.slabs, g.tokens, g.exact, g.heads, g.head_dim)
        items = g.slabs * g.tokens_q * g.heads * g.head_dim
        self.b.launch("cg_transform", items, src, dst, *geo, m, flags, int(live is not None))

    def _check(self, bad: Array, error: type[Exception]) -> None:
        code = int(self.b.download(bad)[0])
        if code:
            raise error(
                f"cachegen cannot encode this chunk: {_ERRORS.get(code, 'a symbol outside its table')}"
            )

    def _token_codes(self, src: Array, g: Geometry) -> Array:
        """Format 4's step codes (int8 ``[slabs][tokens_q]``) of the chunk as stored, on the device."""
        b, count = self.b, g.slabs * g.tokens_q
        code, bad = b.empty(max(count, 1), np.int64), b.upload(np.zeros(1, np.int32))
        geo = (g.slabs, g.tokens, g.channels, g.exact, g.heads)
        b.launch("cg_token_norms", count, src, g.dtype_code, *geo, code, bad)
        self._check(bad, InvalidInput)
        tcodes = b.empty(max(count, 1), np.int8)
        b.launch("cg_token_codes", g.slabs, code, g.slabs, g.tokens_q, tcodes)
        return tcodes

    def _quantize(
        self, src: Array, g: Geometry, plan: QuantPlan, tcodes: Array | None = None
    ) -> tuple[Array, Array]:
        """(qparams, symbols) on the device (steps scaled per (slab, token) by ``tcodes`` when given)."""
        b, nch = self.b, g.num_channels
        sums, sumsq = b.empty(nch, np.float64), b.empty(nch, np.float64)
        mn, mx, bad = b.empty(nch, np.float32), b.empty(nch, np.float32), b.upload(np.zeros(1, np.int32))
        geo = (g.slabs, g.tokens, g.channels, g.exact)
        b.launch("cg_stats", nch, src, g.dtype_code, *geo, sums, sumsq, mn, mx, bad)
        have = int(tcodes is not None)
        codes = tcodes if tcodes is not None else b.upload(np.zeros(1, np.int8))
        tdev = b.empty(nch if have else 1, np.float32)
        if have:
            b.launch("cg_tdev", nch, src, g.dtype_code, *geo, sums, codes, tdev)
        qparams = b.empty(2 * nch, np.uint16)
        targets = b.upload(plan.targets)
        b.launch("cg_params", g.slabs, sums, sumsq, mn, mx, targets, *geo, qparams, bad, tdev, have)
        self._check(bad, InvalidInput)
        sym = b.empty(nch * g.tokens_q, np.uint8)
        b.launch("cg_quantize", nch * g.tokens_q, src, g.dtype_code, *geo, qparams, plan.rounding, sym, codes, have)
        return qparams, sym

    def _tables(self, sym: Array, g: Geometry, prof: ProfileArrays) -> tuple[list[Array], np.ndarray, Cum]:
        """([lo, n, freq] on the device, frequencies per table, coding tables)."""
        b, nch = self.b, g.num_channels
        lo, n, fcount = b.empty(nch, np.uint8), b.empty(nch, np.uint8), b.empty(nch, np.uint32)
        scratch = b.empty(nch * 255, np.uint16)
        shape = (g.slabs, g.tokens_q, g.channels)
        b.launch("cg_tables", nch, sym, *shape, *prof[:3], lo, n, scratch, fcount)
        counts = b.download(fcount)[:nch].astype(np.uint64)
        freq, foff = b.empty(int(counts.sum()), np.uint16), b.upload(_exclusive(counts))
        b.launch("cg_compact_freq", nch, scratch, fcount, foff, nch, freq)
        return [lo, n, freq], counts, self._cum([lo, n, freq, foff], prof, nch)

    def _cum(self, tables: list[Array], prof: ProfileArrays, nch: int) -> Cum:
        """(cum, bucket, lo, n) of the tables in force (inline or the profile's), on the device."""
        b = self.b
        cum, bucket = b.empty(nch * 256, np.uint32), b.empty(nch * 256, np.uint8)
        elo, en = b.empty(nch, np.uint8), b.empty(nch, np.uint8)
        b.launch("cg_build_cum", nch, *tables, *prof, nch, cum, bucket, elo, en)
        return cum, bucket, elo, en

    def _streams(self, sym: Array, g: Geometry, group: int, cum: Cum) -> tuple[np.ndarray, bytes]:
        """(stream ends, stream bytes): one thread per stream into scratch space, then gathered."""
        b, streams = self.b, g.num_streams(group)
        per_slab = -(-g.channels // group)
        widths = np.minimum(group, g.channels - (np.arange(streams) % per_slab) * group).astype(np.uint64)
        bound = 2 * widths * np.uint64(g.tokens_q) + np.uint64(8)  # 2 bytes a symbol, 4 to flush
        base = _exclusive(bound)
        scratch = b.empty(int(bound.sum()), np.uint8)
        lens, bad, base_d = b.empty(streams, np.uint32), b.upload(np.zeros(1, np.int32)), b.upload(base)
        shape = (g.slabs, g.tokens_q, g.channels, group)
        b.launch("cg_encode", streams, sym, *shape, cum[0], cum[2], cum[3], scratch, base_d, lens, bad)
        self._check(bad, CodecError)
        sizes = b.download(lens)[:streams].astype(np.uint64)
        ends = np.cumsum(sizes)
        if ends[-1] > 0xFFFFFFFF:
            raise InvalidInput("cachegen streams of one chunk exceed 4 GiB")
        data = b.empty(int(ends[-1]), np.uint8)
        b.launch("cg_gather", streams, scratch, base_d, lens, b.upload(_exclusive(sizes)), streams, data)
        return ends, b.download(data)[: int(ends[-1])].tobytes()

    def _sections(
        self,
        src: Array,
        g: Geometry,
        group: int,
        plan: QuantPlan,
        profile: ProfileTables,
        theta: float,
        transform: HeadTransform | None = None,
        token_scale: bool = False,
    ) -> list[tuple[str, SectionData]]:
        b = self.b
        tcodes = self._token_codes(src, g) if token_scale else None
        if transform is not None:
            values = b.empty(g.slabs * g.tokens * g.channels, np.float32)
            self._to_float32(src, g, theta, 0, values)
            z = b.empty(g.slabs * g.tokens * g.channels, np.float32)
            self._transform(values, z, g, transform.forward, None)
            qparams, sym = self._quantize(z, g.as_float32(), plan, tcodes)
        elif rope.applies(g, theta):
            values = b.empty(g.slabs * g.tokens * g.channels * 4, np.uint8)
            self._rope(src, g.dtype_code, values, 2, g, theta, 0)
            qparams, sym = self._quantize(values, g.as_float32(), plan, tcodes)
        else:
            qparams, sym = self._quantize(src, g, plan, tcodes)
        (lo, n, freq), counts, cum = self._tables(sym, g, self._profile_arrays(profile, g.num_channels))
        ends, data = self._streams(sym, g, group, cum)
        rows = src.reshape(g.slabs, g.tokens, g.channels * g.itemsize)[:, : g.exact]
        host = [b.download(x).tobytes() for x in (qparams, rows, lo, n)]
        freq_bytes = b.download(freq)[: int(counts.sum())].tobytes()
        values = [*host, freq_bytes, ends.astype("<u4").tobytes(), data]
        if tcodes is not None:
            values.append(b.download(tcodes)[: g.slabs * g.tokens_q].tobytes())
        return pack_sections(dict(zip(section_names(tcodes is not None), values)))

    def _container(
        self, container: bytes | memoryview | U8
    ) -> tuple[Container, Geometry, int, ProfileTables, float, HeadTransform | None]:
        """(container, geometry, group, profile tables, rope theta, transform) of a container this
        codec wrote."""
        c = unpack_for(container, self.codec.name)
        p = CachegenParams.parse(c.params, CodecError, CONTAINER_KEYS, default_format=1)
        names = section_names(p.token_scale)
        if c.dtype not in DTYPE_CODES or tuple(s.name for s in c.sections) != names:
            raise CodecError("not a container cachegen writes (dtype or sections)")
        g = Geometry.of(c.layout, p.exact_tokens)
        if p.rope_theta and (g.kv_factor != 2 or g.head_dim % 2):
            raise CodecError("cachegen container rotates keys of a layout without them (rope_theta)")
        profile = self._profile(p.profile, g, None, CodecError)
        return c, g, p.group, profile, p.rope_theta, self.codec.transform_of(p, g)

    def decode_into(self, container: bytes | memoryview | U8, out: U8 | Array) -> ChunkLayout:
        """Decode into ``out`` (a flat uint8 host or device array of at least the chunk's bytes).

        Raises:
            CodecError: malformed, corrupt, not cachegen, or a profile is missing.
            InvalidInput: ``out`` is too small.
        """
        c, g, group, profile, theta, transform = self._container(container)
        if isinstance(out, np.ndarray):
            host_out: U8 | None = output_bytes(out, c.layout)
            device_out = self.b.empty(c.layout.nbytes, np.uint8)
        else:
            if int(out.size) < c.layout.nbytes:
                raise InvalidInput("output is too small for the decoded chunk")
            host_out, device_out = None, out
        s = open_sections({sec.name: c.section(sec.name) for sec in c.sections}, g, group)
        check_qparams(s["qparams"], g.num_channels, "tscale" in s)
        qparams = self.b.upload(np.frombuffer(s["qparams"], "<u2"))
        if transform is not None:
            z = self.b.empty(g.slabs * g.tokens * g.channels, np.float32)
            self._run_decoder(s, g.as_float32(), group, profile, qparams, z, None)
            x = self.b.empty(g.slabs * g.tokens * g.channels, np.float32)
            live = np.frombuffer(live_components(s), np.uint8)
            self._transform(z, x, g, transform.inverse, live)
            self._to_float32(x, g, theta, 1, device_out)
        elif rope.applies(g, theta):
            values = self.b.empty(g.slabs * g.tokens * g.channels * 4, np.uint8)
            self._run_decoder(s, g.as_float32(), group, profile, qparams, values, None)
            self._rope(values, 2, device_out, g.dtype_code, g, theta, 1)
        else:
            self._run_decoder(s, g, group, profile, qparams, device_out, None)
        if g.exact:
            rows = device_out[: c.layout.nbytes].reshape(g.slabs, g.tokens, -1)
            rows[:, : g.exact] = self.b.upload(
                np.frombuffer(s["exact"], np.uint8).reshape(g.slabs, g.exact, -1)
            )
        if host_out is not None:
            host_out[:] = self.b.download(device_out)[: c.layout.nbytes]
        return c.layout

    def decode_symbols(self, container: bytes | memoryview | U8) -> bytes:
        """The symbols ``[slabs, tokens_q, channels]`` of a container, decoded on the device (for tests).

        Raises:
            CodecError: as :meth:`decode_into`.
        """
        c, g, group, profile, _, _ = self._container(container)
        s = open_sections({sec.name: c.section(sec.name) for sec in c.sections}, g, group)
        sym = self.b.empty(g.num_channels * g.tokens_q, np.uint8)
        self._run_decoder(s, g, group, profile, self.b.empty(2, np.uint16), self.b.empty(1, np.uint8), sym)
        return bytes(self.b.download(sym)[: g.num_channels * g.tokens_q].tobytes())

    def _run_decoder(
        self,
        s: Mapping[str, bytes | memoryview],
        g: Geometry,
        group: int,
        profile: ProfileTables,
        qparams: Array,
        out: Array,
        symbols: Array | None,
    ) -> None:
        """Check the tables and stream table, then decode every stream into ``out`` (or ``symbols``).

        Raises:
            CodecError: a bad table, stream table or stream.
        """
        b, nch, streams = self.b, g.num_channels, g.num_streams(group)
        foff = table_offsets(s["tab_lo"], s["tab_n"], s["tab_freq"], nch, allow_profile=profile is not None)
        ends = stream_ends(s["offsets"], streams, len(s["streams"]))
        kinds = (("tab_lo", np.uint8), ("tab_n", np.uint8), ("tab_freq", "<u2"))
        tables = [b.upload(np.frombuffer(s[k], dt)) for k, dt in kinds] + [b.upload(foff)]
        cum, bucket, elo, _ = self._cum(tables, self._profile_arrays(profile, nch), nch)
        bad, data = b.empty(streams, np.int32), b.upload(np.frombuffer(s["streams"], np.uint8))
        geo = (g.slabs, g.tokens, g.channels, g.exact, group)
        sink = (out, 0, b.empty(1, np.uint8)) if symbols is None else (out, 1, symbols)
        scaled = "tscale" in s and symbols is None
        tcodes = b.upload(np.frombuffer(s["tscale"], np.int8)) if scaled else b.upload(np.zeros(1, np.int8))
        b.launch(
            "cg_decode",
            streams,
            data,
            b.upload(ends),
            *geo,
            cum,
            bucket,
            elo,
            qparams,
            g.dtype_code,
            *sink,
            bad,
            tcodes,
            int(scaled),
        )
        if b.download(bad)[:streams].any():
            raise CodecError("a cachegen stream is corrupt (bytes left over, missing or inconsistent)")
