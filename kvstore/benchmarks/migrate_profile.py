"""The calibrated cachegen profile ``kvstore bench migrate`` starts its daemons with, built once per model.

A calibrated profile (docs/codecs.md: the model's RoPE base and a per-head
transform from the Fisher information of held-out prompts) makes cachegen's
level 1 compress the model's KV about 6x instead of about 4x. Calibrating
takes 10-20 minutes on a CPU, so the profile is cached: the profile itself as
``<digest>.cgprofile`` (content-addressed: the daemons' ``profile_dir``), and
an index file ``<settings key>.json`` naming that digest, where the key is a
digest of the model's identity (name and weights revision), the KV dtype, the
cachegen level and every calibration setting. A later run with the same model
and settings reads the index and the profile (checked against its digest)
and skips the calibration; a missing, unreadable or mismatched file is
rebuilt. The calibration's head statistics (the slow part: Fisher
information and covariance per head) are cached beside them as
``<statistics key>.heads.npz`` (arrays only), keyed without the level and
the profile format, so a new profile format rebuilds only the fast rest.

Directory: ``--profile-dir``, else ``$KVSTORE_PROFILE_CACHE``, else
``$XDG_CACHE_HOME/kvstore/cachegen-profiles`` (``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvstore.codecs import cachegen_profile
from kvstore.codecs.cachegen_profile import SUFFIX, CachegenProfile
from kvstore.codecs.cachegen_transform import HeadStatistics
from kvstore.errors import CodecError, InvalidInput
from kvstore.spec import KVSpec

CACHE_ENV = "KVSTORE_PROFILE_CACHE"
STATS_FORMAT = "kvstore-head-statistics/1"
INDEX_FORMAT = "kvstore-bench-profile-index/1"
#: sampled target sets per prompt, as ``kvstore bench codecs`` calibrates (docs/codecs.md)
CALIBRATION_DRAWS = 2


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """Everything a calibrated profile depends on; its digest names the cache entry.

    Attributes:
        model: the model's name (``ModelFingerprint.name``).
        revision: the weights' revision or digest (``ModelFingerprint.revision``).
        kv_dtype: the dtype of the KV the profile's tables are built from.
        level: cachegen level the profile is built for.
        prompts: held-out calibration prompts.
        context_tokens: context tokens of each calibration prompt.
        continuation_tokens: continuation tokens scored for the Fisher information.
        draws: sampled target sets per prompt.
        seed: seed of the calibration prompts' draw.
        chunk_tokens: tokens per chunk the tables are built from.
        held_out: digest of the prompts kept out of the calibration (the measured ones; "" for none).
        profile_version: the profile blob format version of this code.
    """

    model: str
    revision: str
    kv_dtype: str
    level: int = 1
    prompts: int = 4
    context_tokens: int = 2048
    continuation_tokens: int = 256
    draws: int = CALIBRATION_DRAWS
    seed: int = 2
    chunk_tokens: int = 256
    held_out: str = ""
    profile_version: int = cachegen_profile.VERSION

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidInput("a profile needs the model's name")
        if not 0 <= self.level <= 4:
            raise InvalidInput(f"cachegen level must be in [0, 4], got {self.level}")
        if self.prompts < 1 or self.draws < 1 or self.context_tokens < 2 or self.continuation_tokens < 2:
            raise InvalidInput("calibration needs >= 1 prompt and draw, >= 2 context and continuation tokens")

    @classmethod
    def for_spec(
        cls, spec: KVSpec, held_out: Sequence[Sequence[int]] = (), **settings: int
    ) -> ProfileSettings:
        """Settings for the model and dtype of ``spec``, ``held_out`` prompts (calibration settings as keywords)."""
        return cls(
            spec.model.name, spec.model.revision, spec.dtype, held_out=prompts_digest(held_out), **settings
        )

    @property
    def key(self) -> str:
        """32 hex digits: the first 16 bytes of SHA-256 of the settings as sorted JSON."""
        return _digest(asdict(self))

    @property
    def stats_key(self) -> str:
        """The key of the calibration's head statistics: the settings they depend on (not the level,
        the chunk size or the profile format)."""
        fields = asdict(self)
        for name in ("level", "chunk_tokens", "profile_version"):
            del fields[name]
        return _digest({**fields, "statistics": STATS_FORMAT})


@dataclass(frozen=True, slots=True)
class CachedProfile:
    """A profile in the cache and the codec params a daemon's tier needs to use it."""

    profile: CachegenProfile
    rope_theta: float
    directory: Path
    built: bool  # calibrated in this run (False: read from the cache)
    build_s: float

    def codec_params(self) -> dict[str, int | float | str | bool]:
        """The cachegen params of a tier using this profile (as the daemon reads ``tier_codec``)."""
        return {"level": self.profile.level, "profile": self.profile.digest, "rope_theta": self.rope_theta,
                "profile_dir": str(self.directory)}  # fmt: skip

    def tier_codec(self, tier: str = "disk") -> str:
        """``--tier-codecs`` of a tier storing cachegen with this profile.

        Raises:
            InvalidInput: the directory's path has a character the flag syntax uses (``,:=``).
        """
        where = str(self.directory)
        if any(c in where for c in ",:="):
            raise InvalidInput(f"the profile directory {where!r} must not contain ',', ':' or '='")
        if _numeric(self.profile.digest):  # the flag's parser would read it as a number
            raise InvalidInput(f"profile {self.profile.digest} cannot be named in --tier-codecs; use a config file")
        return f"{tier}=cachegen:" + ":".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in self.codec_params().items())  # fmt: skip


def with_profile(tier_codecs: str, cached: CachedProfile | None) -> str:
    """``tier_codecs`` (``--tier-codecs`` syntax) with every bare cachegen tier of the profile's level
    (``disk=cachegen``, ``disk=cachegen:level=1``) using ``cached``; other entries, and all of them
    without a profile, as they are."""
    if cached is None:
        return tier_codecs
    bare = ("cachegen", f"cachegen:level={cached.profile.level}")
    items = []
    for item in filter(None, (i.strip() for i in tier_codecs.split(","))):
        tier, _, spec = item.partition("=")
        items.append(cached.tier_codec(tier) if spec in bare else item)
    return ",".join(items)


Builder = Callable[[], tuple[CachegenProfile, float]]


def prompts_digest(prompts: Sequence[Sequence[int]]) -> str:
    """16 hex digits naming a list of token-id prompts ("" for none)."""
    if not prompts:
        return ""
    return hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()[:16]


def default_directory() -> Path:
    """``$KVSTORE_PROFILE_CACHE``, else ``$XDG_CACHE_HOME/kvstore/cachegen-profiles`` (``~/.cache``)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvstore" / "cachegen-profiles"


def check_directory(directory: Path) -> Path:
    """``directory`` if it can be the cache: a directory (or nothing yet) under a writable one.

    Raises:
        InvalidInput: it is a file, or neither it nor its nearest existing parent is writable.
    """
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"the profile cache {directory} is not a directory")
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInput(f"the profile cache {directory} cannot be written ({existing} is not a writable directory)")
    return directory


def lookup(directory: Path, settings: ProfileSettings) -> CachedProfile | None:
    """The cached profile for ``settings``, or None (no entry, or an entry whose files are bad)."""
    try:
        index = json.loads((directory / f"{settings.key}.json").read_text())
        if index.get("format") != INDEX_FORMAT or index.get("settings") != asdict(settings):
            return None
        digest = str(index["digest"])
        profile = CachegenProfile.from_bytes((directory / f"{digest}{SUFFIX}").read_bytes())
        rope_theta = float(index["rope_theta"])
    except (OSError, ValueError, KeyError, TypeError, CodecError):
        return None
    if profile.digest != digest or profile.level != settings.level or profile.rope_theta != rope_theta:
        return None
    return CachedProfile(profile, rope_theta, directory, False, float(index.get("build_s", 0.0)))


def cached_profile(directory: Path, settings: ProfileSettings, build: Builder,
                   say: Callable[[str], None] = lambda _: None) -> CachedProfile:  # fmt: skip
    """The profile for ``settings`` from ``directory``, built by ``build`` and stored there if missing.

    Args:
        directory: the cache (created if needed).
        settings: what the profile depends on (its key).
        build: calibrates and returns (profile, rope_theta); called only on a miss.
        say: progress messages (the calibration takes minutes).
    Raises:
        InvalidInput: the directory cannot be created or written.
    """
    found = lookup(directory, settings)
    if found is not None:
        say(f"cachegen profile {found.profile.digest} for {settings.model} (level {settings.level}) "
            f"from the cache in {directory}")  # fmt: skip
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot create the profile cache {directory}: {exc}") from exc
    say(f"calibrating a cachegen profile for {settings.model} (level {settings.level}, {settings.prompts} "
        f"prompts of {settings.context_tokens}+{settings.continuation_tokens} tokens, {settings.draws} draws): "
        f"10-20 minutes on a CPU, once; cached in {directory} (--profile-dir)")  # fmt: skip
    t0 = time.perf_counter()
    profile, rope_theta = build()
    elapsed = time.perf_counter() - t0
    if profile.level != settings.level:
        raise InvalidInput(f"the profile was built for level {profile.level}, not {settings.level}")
    _write(directory, settings, profile, rope_theta, elapsed)
    say(f"cachegen profile {profile.digest} built in {elapsed:.0f} s")
    return CachedProfile(profile, rope_theta, directory, True, elapsed)


def _write(directory: Path, settings: ProfileSettings, profile: CachegenProfile, rope_theta: float,
           elapsed: float) -> None:  # fmt: skip
    """The profile, then its index entry (each atomically: a reader never sees half a file)."""
    try:
        profile.save(directory)
        index = {"format": INDEX_FORMAT, "settings": asdict(settings), "digest": profile.digest,
                 "rope_theta": rope_theta, "build_s": round(elapsed, 1)}  # fmt: skip
        path = directory / f"{settings.key}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(path)
    except OSError as exc:
        raise InvalidInput(f"cannot write the profile cache {directory}: {exc}") from exc


def calibrate_smollm2(settings: ProfileSettings, exclude: Sequence[Sequence[int]] = (),
                      directory: Path | None = None) -> Builder:  # fmt: skip
    """A builder of the recommended profile for the SmolLM2 model (as ``kvstore bench codecs`` builds it):
    the RoPE base and per-head transform from held-out prompts (none of ``exclude``), then the level's
    tables from those prompts' KV. With ``directory``, the head statistics (the slow part) are cached
    there too (``<key>.heads.npz``, arrays only), so that a profile format change rebuilds only the rest."""

    def build() -> tuple[CachegenProfile, float]:
        from kvstore.codecs.cachegen_bench import make_profile, prefill_kv, prompt_ids
        from kvstore.codecs.cachegen_calibrate import calibrate_heads, rope_theta_of
        from kvstore.codecs.cachegen_transform import build_transform
        from kvstore.models import load_smollm2, torch_threads

        total = settings.context_tokens + settings.continuation_tokens
        with torch_threads(2):
            loaded = load_smollm2(settings.kv_dtype)  # type: ignore[arg-type]
            drawn = prompt_ids(loaded, settings.prompts + len(exclude), total, settings.seed)
            ids = _held_out(drawn, exclude)[: settings.prompts]
            if not ids:
                raise InvalidInput("no held-out calibration prompt could be drawn")
            pairs = [(x[: settings.context_tokens], x[settings.context_tokens :]) for x in ids]
            theta = rope_theta_of(loaded)
            path = None if directory is None else directory / f"{settings.stats_key}.heads.npz"
            stats = _load_stats(path, theta)
            if stats is None:
                stats = calibrate_heads(loaded, pairs, draws=settings.draws, rope_theta=theta)
                _save_stats(path, stats)
            kvs = [prefill_kv(loaded, c) for c, _ in pairs]
            spec = loaded.spec_for(settings.kv_dtype)  # type: ignore[arg-type]
            profile = make_profile(kvs, spec, settings.level, None, theta, build_transform(stats))
        return profile, theta

    return build


def _load_stats(path: Path | None, rope_theta: float) -> HeadStatistics | None:
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            fisher, cov, theta = f["fisher"], f["covariance"], float(f["rope_theta"])
    except (OSError, ValueError, KeyError):
        return None
    if theta != rope_theta or fisher.shape != cov.shape or fisher.ndim != 4:
        return None
    return HeadStatistics(fisher.astype(np.float64), cov.astype(np.float64), theta)


def _save_stats(path: Path | None, stats: HeadStatistics) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, fisher=stats.fisher, covariance=stats.covariance, rope_theta=np.float64(stats.rope_theta))
        tmp.replace(path)
    except OSError as exc:
        raise InvalidInput(f"cannot write the profile cache {path.parent}: {exc}") from exc


def _held_out(
    ids: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]], probe: int = 64
) -> list[list[int]]:
    """``ids`` less any prompt that begins like one of ``exclude`` (the measured prompts)."""
    banned = {tuple(x[:probe]) for x in exclude}
    return [list(x) for x in ids if tuple(x[:probe]) not in banned]


def _digest(fields: dict[str, object]) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()[:16].hex()


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
