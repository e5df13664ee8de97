"""What `kvstore bench codecs` measures: one :class:`Variant` per registered codec and level.

A variant names a codec configuration and the prefix of its JSON keys
(``int8`` -> ``int8_ratio``, ``int8_top1`` ...). The codecs' own defaults
are read from their modules, so a new default level is picked up without
editing this table; a registered codec missing from the table is measured
with its default parameters under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kvstore.codecs  # noqa: F401  # registers every codec
from kvstore.codecs import cachegen_params, lossless
from kvstore.codecs.base import CodecParams, codec_names


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
        Variant("int8", "quant int8 (token groups of 128)", "quant", {"bits": 8}),
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
