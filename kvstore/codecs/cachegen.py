"""The ``cachegen`` codec: CacheGen-style (SIGCOMM'24) quantization and range coding of KV.

Per (slab, channel) -- a slab is one layer's K or V -- values are centred on
their mean and quantized with a step of ``sigma / bins`` (``bins`` from the
level, ramped up for shallow layers; the step is raised where a channel's range
would need more than 255 symbols), so every value is off by at most half its
channel's step before the final rounding to the chunk's dtype. The first
``exact_tokens`` tokens of a chunk (the attention sink at a sequence start)
are stored verbatim. Symbols are range-coded with a static 16-bit table per
(slab, channel), taken from a shared :class:`CachegenProfile` where one is
configured, in many independent streams (``group`` channels of one slab each)
that a CPU core or a GPU thread decodes alone. Format, byte by byte, and
measurements: docs/codecs_cachegen.md.

Invariants: encoding is deterministic (same chunk and params, same bytes, on
the CPU and with the CUDA kernels of ``cachegen_gpu.py``); decoding never
trusts a size, offset or table it has not checked, and stops at the chunk's
size; a profile changes the container's size, never its decoded values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, CodecParams, register_codec
from kvstore.codecs.cachegen_coder import SECTION_NAMES, ProfileTables, decode_sections, encode_sections
from kvstore.codecs.cachegen_params import (
    CONFIG_KEYS,
    CONTAINER_KEYS,
    DTYPE_CODES,
    CachegenParams,
    Geometry,
    slab_bins,
)
from kvstore.codecs.cachegen_profile import CachegenProfile, ProfileStore
from kvstore.codecs.container import input_bytes, output_bytes, pack, unpack_for
from kvstore.errors import CodecError, InvalidInput


def _tables(profile: CachegenProfile | None) -> ProfileTables:
    return (profile.lo, profile.n, profile.freq) if profile else None


class CachegenCodec(Codec):
    """CacheGen codec. Params: ``level`` (0 finest .. 3 smallest, default 1), ``exact_tokens``
    (default 1), ``group`` (channels per stream, default 32), ``layer_ramp`` (>= 1, default 1.0),
    ``profile`` (digest of a :class:`CachegenProfile`, default none) and ``profile_dir`` (where
    ``<digest>.cgprofile`` files are found; never written into containers).
    """

    name: ClassVar[str] = "cachegen"
    lossless: ClassVar[bool] = False

    def __init__(self, params: CodecParams | None = None, profiles: Iterable[CachegenProfile] = ()) -> None:
        """Validate the params; ``profiles`` are held in memory besides those in ``profile_dir``.

        Raises:
            InvalidInput: an unknown param or a value of the wrong type or out of range.
        """
        super().__init__(params)
        self.config = CachegenParams.parse(self.params, InvalidInput, CONFIG_KEYS)
        directory = self.params.get("profile_dir", "")
        if not isinstance(directory, str):
            raise InvalidInput(f"cachegen profile_dir must be a string, got {directory!r}")
        self.profiles = ProfileStore(profiles, directory or None)
        self.params = {**self.config.as_dict(), **({"profile_dir": directory} if directory else {})}

    def encode(self, raw: U8, layout: ChunkLayout) -> bytes:
        """Quantize and range-code a float chunk.

        Raises:
            InvalidInput: wrong size, a dtype other than float32/float16/bfloat16, NaN or
                infinite values, or a configured profile that is missing or built for
                another geometry or level.
            CodecError: the C extension is not built.
        """
        data = input_bytes(raw, layout)
        if layout.spec.dtype not in DTYPE_CODES:
            raise InvalidInput(f"cachegen encodes float32/float16/bfloat16 KV, not {layout.spec.dtype}")
        p = self.config
        g = Geometry.of(layout, p.exact_tokens)
        profile = self.profiles.get(p.profile, InvalidInput) if p.profile else None
        if profile is not None:
            profile.check_fits(g, p, InvalidInput)
        sections = encode_sections(data, g, p.group, slab_bins(g, p), _tables(profile))
        return pack(self.name, p.as_dict(), layout, sections)

    def decode_into(self, container: bytes | memoryview | U8, out: U8) -> ChunkLayout:
        """Decode into ``out`` in the spec's dtype.

        Raises:
            CodecError: malformed, corrupt, not a cachegen container, bad params, a missing
                profile, or the C extension is not built.
            InvalidInput: ``out`` is too small.
        """
        c = unpack_for(container, self.name)
        p = CachegenParams.parse(c.params, CodecError, CONTAINER_KEYS)
        if c.dtype not in DTYPE_CODES:
            raise CodecError(f"cachegen container claims dtype {c.dtype}, which cachegen never writes")
        if tuple(s.name for s in c.sections) != SECTION_NAMES:
            raise CodecError(f"cachegen sections {[s.name for s in c.sections]} are not {SECTION_NAMES}")
        g = Geometry.of(c.layout, p.exact_tokens)
        profile = self.profiles.get(p.profile, CodecError) if p.profile else None
        if profile is not None:
            profile.check_fits(g, None, CodecError)
        target = output_bytes(out, c.layout)
        sections = {name: c.section(name) for name in SECTION_NAMES}
        decode_sections(sections, g, p.group, _tables(profile), target)
        return c.layout


register_codec(CachegenCodec.name, CachegenCodec)
