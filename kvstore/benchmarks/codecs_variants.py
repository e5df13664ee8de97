"""What `kvstore bench codecs` measures: one :class:`Variant` per registered codec and level.

A variant names a codec configuration and the prefix of its JSON keys
(``int8`` -> ``int8_ratio``, ``int8_top1`` ...). The codecs' own defaults
are read from their modules, so a new default level is picked up without
editing this table; a registered codec missing from the table is measured
with its default parameters under its own name.

cachegen is measured in its recommended setup (docs/codecs.md, "cachegen"),
built in one place, :func:`cachegen_setup` (what is computed once from the
model) and :func:`cachegen_codecs` (the codecs of one level): a per-head
Fisher-weighted transform calibrated on prompts other than the scored ones
(``cachegen_transform``), keys un-rotated with the model's RoPE base, a
shared per-model profile for 256-token chunks and the same steps with inline
tables for 2048-token chunks. ``--uncalibrated`` measures the plain levels
instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import kvstore.codecs  # noqa: F401  # registers every codec
from kvstore.codecs import cachegen_params, lossless
from kvstore.codecs.base import Codec, CodecParams, codec_names
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_bench import make_profile
from kvstore.codecs.cachegen_calibrate import calibrate_heads, rope_theta_of
from kvstore.codecs.cachegen_params import F64
from kvstore.codecs.cachegen_profile import CachegenProfile
from kvstore.codecs.cachegen_transform import HeadTransform, build_transform
from kvstore.models import LoadedModel
from kvstore.spec import KVSpec

#: sampled target sets per calibration prompt (cachegen_bench's default)
CALIBRATION_DRAWS = 2


@dataclass(frozen=True, slots=True)
class Variant:
    """One codec configuration of the benchmark.

    Invariants: ``key`` is unique among the variants and a valid JSON-key
    prefix; ``alias`` (when set) is the codec's own name and marks its default
    level, whose figures are also recorded under ``alias``; ``profile`` is
    true only for cachegen, whose 256-token ratio uses a shared profile.
    """

    key: str
    label: str
    codec: str
    params: CodecParams = field(default_factory=dict)
    alias: str | None = None
    profile: bool = False

    @property
    def level(self) -> int:
        """The cachegen level (the profile is built for it); 0 for other codecs."""
        value = self.params.get("level", 0)
        return value if isinstance(value, int) else 0


def _quant() -> list[Variant]:
    return [
        Variant("int8", "quant int8 (default: KIVI, groups of 128, token 0 exact)", "quant", {"bits": 8}),
        Variant(
            "int4", "quant int4 KIVI (K per channel, V per token)", "quant", {"bits": 4, "group": "kivi"}
        ),
        Variant("int4_token", "quant int4 (token groups of 128)", "quant", {"bits": 4, "group": "token"}),
        Variant("int2", "quant int2 KIVI", "quant", {"bits": 2, "group": "kivi"}),
        Variant("fp8", "quant fp8 e4m3 (per layer K/V scale)", "quant", {"format": "e4m3"}),
    ]


def _cachegen() -> list[Variant]:
    out = []
    for level in sorted(cachegen_params.LEVEL_BINS):
        default = level == cachegen_params.DEFAULT_LEVEL
        label = f"cachegen level {level}" + (" (default)" if default else "")
        alias = "cachegen" if default else None
        out.append(Variant(f"cachegen_l{level}", label, "cachegen", {"level": level}, alias, True))
    return out


def variants() -> list[Variant]:
    """Every variant, in table order: raw, lossless, quant, cachegen, then any other codec."""
    known = [
        Variant("raw", "raw", "raw"),
        Variant("lossless", f"lossless (zstd {lossless.DEFAULT_LEVEL} + shuffle)", "lossless"),
        *_quant(),
        *_cachegen(),
    ]
    covered = {v.codec for v in known}
    return known + [
        Variant(name, f"{name} (defaults)", name) for name in codec_names() if name not in covered
    ]


def select(all_variants: list[Variant], keys: list[str] | None) -> list[Variant]:
    """The variants named by ``keys`` (all of them when ``keys`` is None), in table order.

    Raises:
        ValueError: a key that names no variant.
    """
    if keys is None:
        return all_variants
    names = {v.key for v in all_variants}
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise ValueError(f"unknown codec variant(s) {unknown}; known: {sorted(names)}")
    return [v for v in all_variants if v.key in keys]


@dataclass(frozen=True, slots=True)
class CachegenSetup:
    """What every cachegen level of a run shares, computed once from the model.

    Invariants: ``sensitivity`` and ``transform`` are both None exactly when the
    run is uncalibrated (then ``rope_theta`` is 0.0: keys coded as they are, the
    plain levels). The recommended setup has a ``transform`` (its components'
    steps are uniform, so no ``sensitivity``); a ``sensitivity`` alone is the
    per-channel calibration (``cachegen_calibrate.calibrate``).
    """

    sensitivity: F64 | None
    rope_theta: float
    transform: HeadTransform | None = None

    @property
    def calibrated(self) -> bool:
        return self.sensitivity is not None or self.transform is not None


@dataclass(frozen=True, slots=True)
class CachegenCodecs:
    """The codecs of one cachegen level: ``stored`` (256-token chunks, the shared profile's tables),
    ``inline`` (the same steps, each container with its own tables: 2048-token chunks)."""

    profile: CachegenProfile
    inline: Codec
    stored: Codec


def cachegen_setup(
    loaded: LoadedModel, prompts: Sequence[tuple[Sequence[int], Sequence[int]]], *, calibrated: bool = True
) -> CachegenSetup:
    """The recommended setup: the model's RoPE base and the per-head transform from the Fisher
    information and covariance of ``prompts`` (context, continuation), keys un-rotated with it.

    ``prompts`` must not be the scored ones. Uncalibrated: neither (the plain levels).

    Raises:
        InvalidInput: a calibration prompt too short, or KV that is not ``kv_separate``
            (``cachegen_calibrate.calibrate_heads``).
    """
    if not calibrated:
        return CachegenSetup(None, 0.0)
    theta = rope_theta_of(loaded)
    stats = calibrate_heads(loaded, prompts, draws=CALIBRATION_DRAWS, rope_theta=theta)
    return CachegenSetup(None, theta, build_transform(stats))


def cachegen_codecs(
    variant: Variant, setup: CachegenSetup, kvs: Sequence[torch.Tensor], spec: KVSpec
) -> CachegenCodecs:
    """The profile (from 256-token chunks of ``kvs``, the calibration prompts' KV) and codecs of
    ``variant``'s level in ``setup`` (as ``cachegen_bench.measure_level`` builds them)."""
    profile = make_profile(kvs, spec, variant.level, setup.sensitivity, setup.rope_theta, setup.transform)
    params: dict[str, int | float | str | bool] = dict(variant.params)
    if setup.rope_theta:
        params["rope_theta"] = setup.rope_theta
    shared: CodecParams = {**params, "profile": profile.digest}
    stored = CachegenCodec(shared, profiles=[profile])
    if not setup.calibrated:
        return CachegenCodecs(profile, CachegenCodec(params), stored)
    inline = CachegenCodec({**shared, "profile_tables": False}, profiles=[profile])
    return CachegenCodecs(profile, inline, stored)
