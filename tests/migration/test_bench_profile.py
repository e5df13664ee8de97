"""The calibrated-profile cache of ``kvstore bench migrate``: built once per model and settings, then read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvstore.benchmarks.migrate_profile import (
    CachedProfile,
    ProfileSettings,
    cached_profile,
    default_directory,
    lookup,
    with_profile,
)
from kvstore.codecs.base import ChunkLayout
from kvstore.codecs.cachegen import CachegenCodec
from kvstore.codecs.cachegen_params import CachegenParams
from kvstore.codecs.cachegen_profile import CachegenProfile, build_profile
from kvstore.codecs.container import unpack
from kvstore.errors import InvalidInput
from kvstore.service.config_load import load_config
from kvstore.spec import KVSpec, ModelFingerprint

SPEC = KVSpec(ModelFingerprint("tiny-model", "sha256:abc"), 2, 2, 16, "bfloat16")


def _chunk(seed: int, tokens: int = 32) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=tokens * SPEC.bytes_per_token // 2).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # bfloat16 bytes


class Builds:
    """A builder that counts its calls (a real profile from sample chunks; no model)."""

    def __init__(self, level: int = 1) -> None:
        self.calls, self.level = 0, level

    def __call__(self) -> tuple[CachegenProfile, float]:
        self.calls += 1
        samples = [(c, ChunkLayout(SPEC, 32)) for c in (_chunk(1), _chunk(2))]
        return build_profile(samples, CachegenParams(level=self.level)), 0.0


def test_a_profile_is_built_once_and_read_back_from_the_cache(tmp_path: Path) -> None:
    settings = ProfileSettings.for_spec(SPEC, held_out=[[1, 2, 3]], prompts=1)
    build, said = Builds(), []
    first = cached_profile(tmp_path / "cache", settings, build, said.append)
    assert first.built and build.calls == 1 and "calibrating" in said[0] and str(tmp_path) in said[0]
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == sorted([f"{first.profile.digest}.cgprofile", f"{settings.key}.json"])  # content-addressed
    again = cached_profile(tmp_path / "cache", settings, build, said.append)
    assert not again.built and build.calls == 1 and again.profile.digest == first.profile.digest
    assert "from the cache" in said[-1]
    # other calibration settings, another model revision or other held-out prompts: another entry
    for other in (ProfileSettings.for_spec(SPEC, held_out=[[1, 2, 3]], prompts=2),
                  ProfileSettings.for_spec(SPEC, prompts=1),
                  ProfileSettings("tiny-model", "sha256:def", "bfloat16", prompts=1)):  # fmt: skip
        assert other.key != settings.key and lookup(tmp_path / "cache", other) is None
    # the daemon reads the tier codec, and its codec encodes with the cached profile
    flag = again.tier_codec("disk")
    choice = load_config({}, {"tiers__codecs": flag}).tiers.codecs["disk"]
    assert choice.codec == "cachegen" and choice.params == again.codec_params()
    blob = CachegenCodec(dict(choice.params)).encode(_chunk(3), ChunkLayout(SPEC, 32))
    assert unpack(blob).params["profile"] == again.profile.digest  # found in the cache directory


def test_a_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    settings = ProfileSettings.for_spec(SPEC, prompts=1)
    build = Builds()
    first = cached_profile(tmp_path, settings, build)
    (tmp_path / f"{first.profile.digest}.cgprofile").write_bytes(b"not a profile")
    assert lookup(tmp_path, settings) is None
    assert cached_profile(tmp_path, settings, build).built and build.calls == 2
    index = tmp_path / f"{settings.key}.json"
    entry = json.loads(index.read_text())
    index.write_text(json.dumps({**entry, "settings": {**entry["settings"], "prompts": 9}}))  # another key's
    assert lookup(tmp_path, settings) is None


def test_bad_settings_and_directories_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="level"):
        ProfileSettings.for_spec(SPEC, level=7)
    with pytest.raises(InvalidInput, match="prompt"):
        ProfileSettings.for_spec(SPEC, prompts=0)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(InvalidInput, match="profile cache"):
        cached_profile(blocked / "sub", ProfileSettings.for_spec(SPEC), Builds())
    with pytest.raises(InvalidInput, match="built for level 2"):
        cached_profile(tmp_path / "c", ProfileSettings.for_spec(SPEC), Builds(level=2))
    profile, _ = Builds()()
    with pytest.raises(InvalidInput, match="must not contain"):
        CachedProfile(profile, 0.0, tmp_path / "a:b", False, 0.0).tier_codec()


def test_bare_cachegen_tiers_get_the_profile_and_others_stay(tmp_path: Path) -> None:
    cached = cached_profile(tmp_path, ProfileSettings.for_spec(SPEC), Builds())
    got = with_profile("disk=cachegen,redis=quant:bits=8", cached).split(",")
    assert got == [cached.tier_codec("disk"), "redis=quant:bits=8"]
    assert with_profile("disk=cachegen:level=3", cached) == "disk=cachegen:level=3"  # another level
    assert with_profile("disk=cachegen", None) == "disk=cachegen"


def test_the_default_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSTORE_PROFILE_CACHE", str(tmp_path / "p"))
    assert default_directory() == tmp_path / "p"
    monkeypatch.delenv("KVSTORE_PROFILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_directory() == tmp_path / "x" / "kvstore" / "cachegen-profiles"


def test_head_statistics_are_cached_apart_from_the_level_and_format(tmp_path: Path) -> None:
    from kvstore.benchmarks.migrate_profile import _load_stats, _save_stats
    from kvstore.codecs.cachegen_transform import HeadStatistics

    one, two = ProfileSettings.for_spec(SPEC, level=1), ProfileSettings.for_spec(SPEC, level=2)
    assert one.key != two.key and one.stats_key == two.stats_key  # a level change keeps the slow part
    assert ProfileSettings.for_spec(SPEC, draws=3).stats_key != one.stats_key
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 2, 16, 16))
    stats = HeadStatistics(g @ g.transpose(0, 1, 3, 2), np.eye(16) * np.ones((4, 2, 1, 1)), 1e5)
    path = tmp_path / f"{one.stats_key}.heads.npz"
    assert _load_stats(path, 1e5) is None
    _save_stats(path, stats)
    back = _load_stats(path, 1e5)
    assert back is not None and np.array_equal(back.fisher, stats.fisher) and back.rope_theta == 1e5
    assert _load_stats(path, 1e4) is None  # another RoPE base: not these statistics
    path.write_bytes(b"garbage")
    assert _load_stats(path, 1e5) is None


def test_the_cache_directory_is_checked_before_any_work(tmp_path: Path) -> None:
    from kvstore.benchmarks.migrate_profile import check_directory

    assert check_directory(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # made on first use
    (tmp_path / "f").write_text("")
    with pytest.raises(InvalidInput, match="not a directory"):
        check_directory(tmp_path / "f")
    with pytest.raises(InvalidInput, match="cannot be written"):
        check_directory(tmp_path / "f" / "sub")
