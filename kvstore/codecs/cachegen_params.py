"""CacheGen parameters, levels and the chunk geometry the coder sees.

A chunk is cut into *slabs*: one per (layer, K/V) for ``kv_separate`` and
one per layer for ``mla_latent``. A slab is a ``[tokens, channels]`` matrix
(``channels = kv_heads * head_dim``), C-contiguous in the chunk, so slab ``s``
starts at element ``s * tokens * channels``. Every (slab, channel) has its own
mean, step and symbol table; streams cover ``group`` channels of one slab.

The quantization step of slab ``s`` is ``sigma_s / bins_s`` (``sigma_s``: RMS
over the slab's channels of each channel's standard deviation), raised per
channel where the channel's range would not fit 255 symbols. ``bins_s`` is the
level's bins times ``layer_ramp ** ((L - 1 - layer) / (L - 1))``: shallow
layers get up to ``layer_ramp`` times more bins (finer steps), as in CacheGen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from kvstore.codecs.base import ChunkLayout, CodecParams

NUM_SYMBOLS: Final = 255
QMAX: Final = 127
FREQ_TOTAL: Final = 1 << 16
MAX_GROUP: Final = 4096

#: level -> bins per sigma of a slab (step = sigma / bins); higher levels are smaller and coarser
LEVEL_BINS: Final[dict[int, float]] = {0: 4.0, 1: 3.0, 2: 2.0, 3: 1.4, 4: 1.1}
#: level -> step scale with a calibrated sensitivity (step = lambda / sqrt(sensitivity))
LEVEL_LAMBDA: Final[dict[int, float]] = {0: 2.76e-5, 1: 3.55e-5, 2: 4.33e-5, 3: 6.0e-5, 4: 7.7e-5}
#: level -> uniform step of every component with a per-head transform (cachegen_transform)
LEVEL_DELTA: Final[dict[int, float]] = {0: 2.4e-5, 1: 3.0e-5, 2: 3.6e-5, 3: 4.5e-5, 4: 6.0e-5}
#: with per-token step scales (format 4), every level's step is this many times its own: the scales make
#: small-norm tokens (those attention piles onto) finer and the rest coarser (docs/codecs.md)
TOKEN_SCALE_STEP: Final = 1.3
#: format 4's step multiplier of code k (-8..8) as float32 bits: bfloat16(2^(k/4)), exactly the C and CUDA
#: coders' table (a bfloat16 step times one of these is exact in float32)
TOKEN_MULTIPLIER_BITS: Final = (
    0x3E800000, 0x3E980000, 0x3EB50000, 0x3ED70000, 0x3F000000, 0x3F180000, 0x3F350000, 0x3F570000,
    0x3F800000, 0x3F980000, 0x3FB50000, 0x3FD70000, 0x40000000, 0x40180000, 0x40350000, 0x40570000,
    0x40800000,
)  # fmt: skip
#: level -> rounding offset in 1/256 (128: round to nearest; less: a deadzone around zero)
LEVEL_ROUNDING: Final[dict[int, int]] = {0: 128, 1: 128, 2: 128, 3: 128, 4: 128}
DEFAULT_LEVEL: Final = 1
#: the coder's dtype codes (kvstore/native/rangecoder.c)
DTYPE_CODES: Final[dict[str, int]] = {"bfloat16": 0, "float16": 1, "float32": 2}
#: keys a container's params hold; ``profile_dir`` and ``profile_tables`` are local encoder
#: configuration and never stored
CONTAINER_KEYS: Final = frozenset(
    {"format", "level", "exact_tokens", "group", "layer_ramp", "profile", "rope_theta", "transform"}
)
#: container format: 1 (no ``format`` key) never rotates keys; 2 may (``rope_theta``); 3 may also
#: name the profile whose per-head transform its values went through (``transform``); 4 adds the
#: ``tscale`` section, a step code per (slab, token) (``token_scale``)
FORMAT: Final = 4
MAX_ROPE_THETA: Final = 1e12
#: ``transform`` is never configured: the encoder uses the transform of its profile when it has one;
#: ``token_scale`` is configured, and a container says it by its format (4)
CONFIG_KEYS: Final = (CONTAINER_KEYS - {"transform"}) | {"profile_dir", "profile_tables", "token_scale"}

F64 = npt.NDArray[np.float64]


def _int(params: CodecParams, key: str, default: int, error: type[Exception]) -> int:
    value = params.get(key, default)
    if type(value) is not int:
        raise error(f"cachegen param {key} must be an int, got {value!r}")
    return value


def _float(params: CodecParams, key: str, default: float, error: type[Exception]) -> float:
    value = params.get(key, default)
    if type(value) not in (int, float):
        raise error(f"cachegen param {key} must be a number, got {value!r}")
    return float(value)


def _str(params: CodecParams, key: str, error: type[Exception]) -> str:
    value = params.get(key, "")
    if not isinstance(value, str):
        raise error(f"cachegen param {key} must be a string, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class CachegenParams:
    """Validated cachegen settings; :meth:`as_dict` is what a container stores.

    Invariants: ``level`` is a key of :data:`LEVEL_BINS`; ``0 <= exact_tokens``;
    ``1 <= group <= MAX_GROUP``; ``1 <= layer_ramp <= 8``; ``profile`` is ""
    (none) or a 32-hex-digit profile digest, and so is ``transform`` (the profile whose per-head
    transform the values went through, formats 3 and 4); ``rope_theta`` is 0 (keys coded as they are) or
    in ``(1, MAX_ROPE_THETA]`` (keys un-rotated by that RoPE base before quantizing); ``token_scale``:
    each (slab, token) has a step code (format 4, :func:`cachegen_coder.token_codes`).
    """

    level: int = DEFAULT_LEVEL
    exact_tokens: int = 1
    group: int = 32
    layer_ramp: float = 1.0
    profile: str = ""
    rope_theta: float = 0.0
    transform: str = ""
    token_scale: bool = True

    @classmethod
    def parse(
        cls, params: CodecParams, error: type[Exception], keys: frozenset[str], default_format: int = FORMAT
    ) -> CachegenParams:
        """Check ``params`` (missing keys take defaults) against the allowed ``keys``; a container
        without ``format`` (``default_format=1`` when parsing one) is of format 1.

        Raises:
            error: an unknown key, or a value of the wrong type or out of range.
        """
        unknown = set(params) - keys
        if unknown:
            raise error(f"cachegen takes {sorted(keys)}, got unknown {sorted(unknown)}")
        level = _int(params, "level", DEFAULT_LEVEL, error)
        exact, group = _int(params, "exact_tokens", 1, error), _int(params, "group", 32, error)
        ramp, profile = _float(params, "layer_ramp", 1.0, error), _str(params, "profile", error)
        rope, fmt = _float(params, "rope_theta", 0.0, error), _int(params, "format", default_format, error)
        transform = _str(params, "transform", error)
        if fmt not in (1, 2, 3, FORMAT) or (fmt == 1 and rope) or (fmt < 3 and "transform" in params):
            raise error(
                f"cachegen container format {fmt} (with rope_theta {rope}) is not one this version reads"
            )
        scaled = params.get("token_scale", fmt >= 4)
        if not isinstance(scaled, bool) or ("token_scale" in params and "format" in params):
            raise error(f"cachegen token_scale must be a bool (and not given with a format), got {scaled!r}")
        if rope and not 1.0 < rope <= MAX_ROPE_THETA:
            raise error(f"cachegen rope_theta must be 0 or in (1, {MAX_ROPE_THETA:g}], got {rope}")
        if level not in LEVEL_BINS:
            raise error(f"cachegen level must be one of {sorted(LEVEL_BINS)}, got {level}")
        if not 0 <= exact <= 1 << 24 or not 1 <= group <= MAX_GROUP:
            raise error(f"cachegen exact_tokens {exact} or group {group} out of range")
        if not 1.0 <= ramp <= 8.0:
            raise error(f"cachegen layer_ramp must be in [1, 8], got {ramp}")
        for key, digest in (("profile", profile), ("transform", transform)):
            if digest and (len(digest) != 32 or any(ch not in "0123456789abcdef" for ch in digest)):
                raise error(f"cachegen {key} must be a 32-hex-digit digest, got {digest!r}")
        return cls(level, exact, group, ramp, profile, rope, transform, scaled)

    @property
    def format(self) -> int:
        """The container format these params write: 4 with token steps, else 3 with a transform, else 2."""
        return FORMAT if self.token_scale else 3 if self.transform else 2

    def as_dict(self) -> dict[str, int | float | str | bool]:
        """The container's params (the format says whether there are token step codes)."""
        out: dict[str, int | float | str | bool] = {
            "format": self.format,
            "level": self.level,
            "exact_tokens": self.exact_tokens,
            "group": self.group,
            "layer_ramp": self.layer_ramp,
            "profile": self.profile,
            "rope_theta": self.rope_theta,
        }
        if self.transform:
            out["transform"] = self.transform
        return out


@dataclass(frozen=True, slots=True)
class Geometry:
    """How the coder sees a chunk: ``slabs`` matrices of ``[tokens, channels]`` values.

    Invariants: ``slabs = num_layers * kv_factor``; ``0 <= exact <= tokens``.
    """

    slabs: int
    tokens: int
    channels: int
    exact: int
    kv_factor: int
    dtype_code: int
    itemsize: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, layout: ChunkLayout, exact_tokens: int) -> Geometry:
        """The geometry of ``layout`` (its dtype must be one of :data:`DTYPE_CODES`)."""
        spec = layout.spec
        return cls(
            slabs=spec.num_layers * spec.kv_factor,
            tokens=layout.num_tokens,
            channels=spec.num_kv_heads * spec.head_dim,
            exact=min(exact_tokens, layout.num_tokens),
            kv_factor=spec.kv_factor,
            dtype_code=DTYPE_CODES[spec.dtype],
            itemsize=spec.itemsize,
            heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
        )

    def as_float32(self) -> Geometry:
        """The same chunk held as float32 (what the coder quantizes when keys are un-rotated)."""
        return replace(self, dtype_code=DTYPE_CODES["float32"], itemsize=4)

    @property
    def num_channels(self) -> int:
        """Tables in a chunk: one per (slab, channel)."""
        return self.slabs * self.channels

    @property
    def tokens_q(self) -> int:
        """Tokens that are quantized and range-coded (the rest are stored exactly)."""
        return self.tokens - self.exact

    def num_streams(self, group: int) -> int:
        return self.slabs * -(-self.channels // group)


def token_multipliers(codes: bytes | memoryview) -> npt.NDArray[np.float32]:
    """The step multiplier (float32) of each format 4 step code (int8 in [-8, 8])."""
    table = np.array(TOKEN_MULTIPLIER_BITS, np.uint32).view(np.float32)
    return table[np.frombuffer(codes, np.int8).astype(np.int64) + 8]


def slab_bins(geometry: Geometry, params: CachegenParams) -> F64:
    """Bins per sigma of every slab (level bins, ramped up toward the first layer)."""
    layers = geometry.slabs // geometry.kv_factor
    depth = np.arange(layers, dtype=np.float64)
    frac = (layers - 1 - depth) / max(layers - 1, 1)
    per_layer = LEVEL_BINS[params.level] * np.power(params.layer_ramp, frac)
    return np.repeat(per_layer, geometry.kv_factor)


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """How the encoder quantizes a chunk: per-channel step targets and the rounding offset.

    Invariants: ``targets`` holds ``2 * N`` finite non-negative doubles (``a`` then ``b``, see
    :func:`step_targets`); ``0 <= rounding <= 128``. The decoder never needs it: the steps it
    produces are stored in the container.
    """

    targets: F64
    rounding: int

    @classmethod
    def of(
        cls, geometry: Geometry, params: CachegenParams, sensitivity: F64 | None, transformed: bool = False
    ) -> QuantPlan:
        return cls(step_targets(geometry, params, sensitivity, transformed), LEVEL_ROUNDING[params.level])


def step_targets(
    geometry: Geometry, params: CachegenParams, sensitivity: F64 | None, transformed: bool = False
) -> F64:
    """The coder's step targets ``a`` then ``b`` (``N`` each): channel ``i``'s step is ``sigma * a_i + b_i``.

    Without a sensitivity, ``a`` = 1 / the slab's bins and ``b`` = 0 (one step per slab, relative to
    its spread). With one (``N`` positive numbers: how much the model's output moves per unit of
    squared error in each channel, from :mod:`cachegen_calibrate`), ``a`` = 0 and ``b`` =
    ``LEVEL_LAMBDA[level] / sqrt(sensitivity)``: absolute steps that give every channel the same
    share of the predicted output error at the smallest size. ``transformed``: the channels are the
    components of a per-head transform (:mod:`cachegen_transform`), already in the model's error
    metric: ``b = LEVEL_DELTA[level] / sqrt(sensitivity)`` (1 everywhere: one uniform step).
    """
    n = geometry.num_channels
    scale = TOKEN_SCALE_STEP if params.token_scale else 1.0
    if transformed:
        w = np.ones(n) if sensitivity is None else sensitivity.astype(np.float64)
        return np.concatenate([np.zeros(n), scale * LEVEL_DELTA[params.level] / np.sqrt(w)])
    if sensitivity is None:
        a = np.repeat(scale / slab_bins(geometry, params), geometry.channels)
        return np.concatenate([a, np.zeros(n)])
    w = sensitivity.astype(np.float64)
    if params.rope_theta and geometry.kv_factor == 2:  # a key pair's error turns with it: one step per pair
        pairs = w.reshape(geometry.slabs // 2, 2, geometry.heads, 2, geometry.head_dim // 2)
        pairs[:, 0] = pairs[:, 0].mean(axis=2, keepdims=True)  # K slabs: [layers][heads][half][d]
        w = pairs.reshape(-1)
    b = scale * LEVEL_LAMBDA[params.level] / np.sqrt(w)
    return np.concatenate([np.zeros(n), b])
