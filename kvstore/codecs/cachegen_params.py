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

from dataclasses import dataclass
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
DEFAULT_LEVEL: Final = 1
#: the coder's dtype codes (kvstore/native/rangecoder.c)
DTYPE_CODES: Final[dict[str, int]] = {"bfloat16": 0, "float16": 1, "float32": 2}
#: keys a container's params hold; ``profile_dir`` is local configuration and never stored
CONTAINER_KEYS: Final = frozenset({"level", "exact_tokens", "group", "layer_ramp", "profile"})
CONFIG_KEYS: Final = CONTAINER_KEYS | {"profile_dir"}

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
    (none) or a 32-hex-digit profile digest.
    """

    level: int = DEFAULT_LEVEL
    exact_tokens: int = 1
    group: int = 32
    layer_ramp: float = 1.0
    profile: str = ""

    @classmethod
    def parse(cls, params: CodecParams, error: type[Exception], keys: frozenset[str]) -> CachegenParams:
        """Check ``params`` (missing keys take defaults) against the allowed ``keys``.

        Raises:
            error: an unknown key, or a value of the wrong type or out of range.
        """
        unknown = set(params) - keys
        if unknown:
            raise error(f"cachegen takes {sorted(keys)}, got unknown {sorted(unknown)}")
        level = _int(params, "level", DEFAULT_LEVEL, error)
        exact, group = _int(params, "exact_tokens", 1, error), _int(params, "group", 32, error)
        ramp, profile = _float(params, "layer_ramp", 1.0, error), _str(params, "profile", error)
        if level not in LEVEL_BINS:
            raise error(f"cachegen level must be one of {sorted(LEVEL_BINS)}, got {level}")
        if not 0 <= exact <= 1 << 24 or not 1 <= group <= MAX_GROUP:
            raise error(f"cachegen exact_tokens {exact} or group {group} out of range")
        if not 1.0 <= ramp <= 8.0:
            raise error(f"cachegen layer_ramp must be in [1, 8], got {ramp}")
        if profile and (len(profile) != 32 or any(ch not in "0123456789abcdef" for ch in profile)):
            raise error(f"cachegen profile must be a 32-hex-digit digest, got {profile!r}")
        return cls(level, exact, group, ramp, profile)

    def as_dict(self) -> dict[str, int | float | str | bool]:
        return {
            "level": self.level,
            "exact_tokens": self.exact_tokens,
            "group": self.group,
            "layer_ramp": self.layer_ramp,
            "profile": self.profile,
        }


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
        )

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


def slab_bins(geometry: Geometry, params: CachegenParams) -> F64:
    """Bins per sigma of every slab (level bins, ramped up toward the first layer)."""
    layers = geometry.slabs // geometry.kv_factor
    depth = np.arange(layers, dtype=np.float64)
    frac = (layers - 1 - depth) / max(layers - 1, 1)
    per_layer = LEVEL_BINS[params.level] * np.power(params.layer_ramp, frac)
    return np.repeat(per_layer, geometry.kv_factor)
