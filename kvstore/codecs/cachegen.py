"""The ``cachegen`` codec: CacheGen-style (SIGCOMM'24) quantization and range coding of KV.

Per (slab, channel) -- a slab is one layer's K or V -- values are centred on
their mean and quantized with a per-channel step: ``sigma_slab / bins``
(``bins`` from the level) by default, or, with a calibrated profile,
``LEVEL_LAMBDA[level] / sqrt(sensitivity)`` (the model's measured sensitivity
to each channel, :mod:`cachegen_calibrate`), raised where a channel's range
would need more than 255 symbols; every value is off by at most half its
channel's step before the final rounding to the chunk's dtype. With
``rope_theta``, keys are un-rotated (RoPE, positions within the chunk) before
quantizing and rotated back after decoding (:mod:`cachegen_rope`). With a
profile that holds a per-head transform, the values are quantized as that
transform's components with one step per level (:mod:`cachegen_transform`);
such containers (format 3) name the profile as ``transform``. With ``token_scale`` (the default),
each (slab, token) also has a step code from the token's own norms (format 4: finer steps for
small-norm tokens, those attention piles onto; :func:`cachegen_coder.token_codes`). The first
``exact_tokens`` tokens of a chunk (the attention sink at a sequence start)
are stored verbatim. Symbols are range-coded with a static 16-bit table per
(slab, channel), taken from a shared :class:`CachegenProfile` where one is
configured, in many independent streams (``group`` channels of one slab each)
that a CPU core or a GPU thread decodes alone. Format, byte by byte, and
measurements: the cachegen section of docs/codecs.md.

Invariants: encoding is deterministic (same chunk and params, same bytes, on
the CPU and with the CUDA kernels of ``cachegen_gpu.py``); decoding never
trusts a size, offset or table it has not checked, and stops at the chunk's
size; a profile's tables change the container's size, never its decoded
values (its sensitivity, when it has one, sets the steps).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import ClassVar

from kvstore.buffers import U8
from kvstore.codecs.base import ChunkLayout, Codec, CodecParams, register_codec
from kvstore.codecs.cachegen_coder import ProfileTables, decode_sections, encode_sections, section_names
from kvstore.codecs.cachegen_params import (
    CONFIG_KEYS,
    CONTAINER_KEYS,
    DTYPE_CODES,
    CachegenParams,
    Geometry,
    QuantPlan,
)
from kvstore.codecs.cachegen_profile import CachegenProfile, ProfileStore
from kvstore.codecs.cachegen_transform import HeadTransform
from kvstore.codecs.container import input_bytes, output_bytes, pack, unpack_for
from kvstore.errors import CodecError, InvalidInput


def _tables(profile: CachegenProfile | None) -> ProfileTables:
    return (profile.lo, profile.n, profile.freq) if profile else None


@dataclass(frozen=True, slots=True)
class EncodeSetup:
    """What encoding one chunk needs: its geometry, the quantization plan, the profile tables
    the encoder may use (None: inline tables only) and the params the container stores (they name
    the profile only when its tables may be used: the decoder needs nothing else from it)."""

    geometry: Geometry
    plan: QuantPlan
    tables: ProfileTables
    params: dict[str, int | float | str | bool]
    transform: HeadTransform | None = None


class CachegenCodec(Codec):
    """CacheGen codec. Params: ``level`` (0 finest .. 4 smallest, default 1), ``exact_tokens``
    (default 1), ``group`` (channels per stream, default 32), ``layer_ramp`` (>= 1, default 1.0),
    ``profile`` (digest of a :class:`CachegenProfile`, default none), ``rope_theta`` (0: keys as
    they are; else the model's RoPE base), and, never written into containers, ``profile_dir``
    (where ``<digest>.cgprofile`` files are found) and ``profile_tables`` (default true; false
    keeps the profile's sensitivity but writes inline tables, so containers name no profile), and
    ``token_scale`` (default true: per-(slab, token) step codes, container format 4; false writes
    format 2 or 3 as earlier versions did).
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
        tables = self.params.get("profile_tables", True)
        if not isinstance(tables, bool):
            raise InvalidInput(f"cachegen profile_tables must be a bool, got {tables!r}")
        self.profile_tables = tables
        local = {"profile_dir": directory} if directory else {}
        self.params = {**self.config.as_dict(), **local, **({} if tables else {"profile_tables": False})}

    def encode(self, raw: U8, layout: ChunkLayout) -> bytes:
        """Quantize and range-code a float chunk.

        Raises:
            InvalidInput: wrong size, a dtype other than float32/float16/bfloat16, NaN or
                infinite values, or a configured profile that is missing or built for
                another geometry or level.
            CodecError: the C extension is not built.
        """
        data = input_bytes(raw, layout)
        setup = self.setup(layout)
        p = self.config
        sections = encode_sections(
            data, setup.geometry, p.group, setup.plan, setup.tables, p.rope_theta, setup.transform, p.token_scale
        )
        return pack(self.name, setup.params, layout, sections)

    def setup(self, layout: ChunkLayout) -> EncodeSetup:
        """How a chunk of ``layout`` is encoded (shared by the CPU coder and ``GpuCoder``).

        Raises:
            InvalidInput: a dtype cachegen does not encode, or a configured profile that is missing
                or built for another geometry or level.
        """
        if layout.spec.dtype not in DTYPE_CODES:
            raise InvalidInput(f"cachegen encodes float32/float16/bfloat16 KV, not {layout.spec.dtype}")
        p = self.config
        g = Geometry.of(layout, p.exact_tokens)
        if p.rope_theta and (g.kv_factor != 2 or g.head_dim % 2):
            raise InvalidInput("cachegen rope_theta needs kv_separate KV with an even head_dim")
        profile = self.profiles.get(p.profile, InvalidInput) if p.profile else None
        if profile is not None:
            profile.check_fits(g, p, InvalidInput)
        transform = profile.transform if profile is not None else None
        plan = QuantPlan.of(g, p, profile.sensitivity if profile is not None else None, transform is not None)
        tables = _tables(profile) if self.profile_tables else None
        params = p.as_dict() if tables is not None else {**p.as_dict(), "profile": ""}
        if transform is not None:
            params = replace(p, transform=p.profile).as_dict()
            params["profile"] = p.profile if tables is not None else ""
        return EncodeSetup(g, plan, tables, params, transform)

    def decode_into(self, container: bytes | memoryview | U8, out: U8) -> ChunkLayout:
        """Decode into ``out`` in the spec's dtype.

        Raises:
            CodecError: malformed, corrupt, not a cachegen container, bad params, a missing
                profile, or the C extension is not built.
            InvalidInput: ``out`` is too small.
        """
        c = unpack_for(container, self.name)
        p = CachegenParams.parse(c.params, CodecError, CONTAINER_KEYS, default_format=1)
        if c.dtype not in DTYPE_CODES:
            raise CodecError(f"cachegen container claims dtype {c.dtype}, which cachegen never writes")
        names = section_names(p.token_scale)
        if tuple(s.name for s in c.sections) != names:
            raise CodecError(f"cachegen sections {[s.name for s in c.sections]} are not {names}")
        g = Geometry.of(c.layout, p.exact_tokens)
        if p.rope_theta and (g.kv_factor != 2 or g.head_dim % 2):
            raise CodecError("cachegen container rotates keys of a layout without them (rope_theta)")
        profile = self.profiles.get(p.profile, CodecError) if p.profile else None
        if profile is not None:
            profile.check_fits(g, None, CodecError)
        transform = self.transform_of(p, g)
        target = output_bytes(out, c.layout)
        sections = {name: c.section(name) for name in names}
        decode_sections(sections, g, p.group, _tables(profile), target, p.rope_theta, transform)
        return c.layout

    def transform_of(self, p: CachegenParams, g: Geometry) -> HeadTransform | None:
        """The transform a container's values went through (None: none).

        Raises:
            CodecError: the named profile is missing, has no transform or one for other heads.
        """
        if not p.transform:
            return None
        owner = self.profiles.get(p.transform, CodecError)
        owner.check_fits(g, None, CodecError)
        if owner.transform is None:
            raise CodecError(f"cachegen profile {p.transform} named as a transform has none")
        return owner.transform


register_codec(CachegenCodec.name, CachegenCodec)
