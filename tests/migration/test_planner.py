"""The per-chunk codec planner with synthetic link and codec numbers."""

from __future__ import annotations

import math

import pytest

from kvstore.errors import InvalidInput
from kvstore.service.migration.planner import CodecOption, PlanInput, plan

MB = 1e6
RAW = CodecOption("raw", "raw")
LOSSLESS = CodecOption("lossless", "lossless", {}, 0, ratio=1.2, encode_bytes_per_s=400 * MB, decode_bytes_per_s=800 * MB)
INT8 = CodecOption("int8", "quant", {"bits": 8}, 1, ratio=1.9, encode_bytes_per_s=600 * MB, decode_bytes_per_s=900 * MB)
CG = CodecOption("cachegen-2", "cachegen", {"level": 2}, 2, ratio=5.0, encode_bytes_per_s=800 * MB,
                 decode_bytes_per_s=800 * MB)
INT4 = CodecOption("int4", "quant", {"bits": 4}, 5, ratio=3.5, encode_bytes_per_s=600 * MB, decode_bytes_per_s=900 * MB)
ALL = [INT4, CG, RAW, INT8, LOSSLESS]  # any order: the planner sorts by quality
GBIT = 125 * MB  # 1 Gbit/s in bytes per second
KV_2K = 2048 * 23040  # SmolLM2's bf16 KV of 2K tokens


def test_no_deadline_or_no_estimate_picks_the_least_lossy() -> None:
    assert plan(ALL, PlanInput(KV_2K, None, GBIT)).option.quality_rank == 0
    first = plan(ALL, PlanInput(KV_2K, 0.01, None))
    assert first.option is RAW and first.projected_s is None and first.meets_deadline


def test_a_loose_deadline_keeps_raw_and_a_tight_one_compresses() -> None:
    ideal = KV_2K / GBIT  # ~0.38 s raw
    loose = plan(ALL, PlanInput(KV_2K, 2 * ideal, GBIT))
    assert loose.option is LOSSLESS and loose.meets_deadline  # rank 0; 1.2x beats raw on this link
    assert plan([RAW, INT8, CG], PlanInput(KV_2K, 2 * ideal, GBIT)).option is RAW
    tight = plan(ALL, PlanInput(KV_2K, ideal / 1.5, GBIT))
    assert tight.option is INT8 and tight.meets_deadline  # 1.9x is enough: no need to go lossier
    tighter = plan(ALL, PlanInput(KV_2K, ideal / 4, GBIT))
    assert tighter.option is CG and tighter.meets_deadline
    assert tighter.projected_s == pytest.approx(KV_2K / 5 / GBIT)


def test_bandwidth_halving_mid_transfer_moves_to_a_lossier_codec() -> None:
    left, time_left = KV_2K // 2, 0.3
    assert plan(ALL, PlanInput(left, time_left, GBIT)).option.quality_rank == 0  # 0.18 s raw fits
    slower = plan(ALL, PlanInput(left, time_left, GBIT / 2))  # 0.37 s raw, 0.31 s lossless do not
    assert slower.option is INT8 and slower.meets_deadline


def test_lossless_beats_raw_at_equal_quality_only_when_faster() -> None:
    slow_link = 10 * MB
    assert plan([RAW, LOSSLESS], PlanInput(KV_2K, 100.0, slow_link)).option is LOSSLESS
    fast_link = 10_000 * MB  # the coder would be the bottleneck
    assert plan([RAW, LOSSLESS], PlanInput(KV_2K, 100.0, fast_link)).option is RAW


def test_impossible_deadline_reports_whether_recompute_is_cheaper() -> None:
    hopeless = PlanInput(KV_2K, 0.001, 10 * MB, recompute_s=0.5)
    p = plan(ALL, hopeless)
    assert not p.meets_deadline and p.option is CG  # the fastest: misses by the least
    assert p.recompute_cheaper  # 0.5 s of prefill beats ~0.94 s on the wire
    q = plan(ALL, PlanInput(KV_2K, 0.001, 10 * MB, recompute_s=5.0))
    assert not q.meets_deadline and not q.recompute_cheaper
    assert not plan(ALL, PlanInput(KV_2K, -1.0, GBIT)).meets_deadline  # deadline already passed


def test_a_slow_coder_limits_the_projection() -> None:
    slow = CodecOption("slow", "cachegen", {}, 2, ratio=10.0, encode_bytes_per_s=10 * MB, decode_bytes_per_s=1e12)
    assert slow.projected_s(100 * MB, GBIT) == pytest.approx(10.0)
    assert RAW.projected_s(100 * MB, GBIT) == pytest.approx(0.8)
    assert math.isinf(RAW.encode_bytes_per_s)


def test_bad_options_are_refused() -> None:
    with pytest.raises(InvalidInput):
        plan([], PlanInput(1, 1.0, 1.0))
    with pytest.raises(InvalidInput):
        CodecOption("x", "raw", ratio=0)
    with pytest.raises(InvalidInput):
        CodecOption("x", "raw", quality_rank=-1)


def test_a_container_held_here_and_stored_as_is_by_the_peer_costs_no_coding() -> None:
    # this machine's cachegen: ratio 6, encode 100 MB/s, decode 140 MB/s; int4 ratio 3.7, 260 / 530 MB/s
    cg1 = CodecOption("cachegen-1", "cachegen", {"level": 1}, 3, ratio=6.0, encode_bytes_per_s=100 * MB,
                      decode_bytes_per_s=140 * MB)  # fmt: skip
    int4 = CodecOption("int4", "quant", {"bits": 4}, 6, ratio=3.7, encode_bytes_per_s=260 * MB,
                       decode_bytes_per_s=530 * MB)  # fmt: skip
    options, time_left = [RAW, cg1, int4], KV_2K / GBIT / 4  # a quarter of raw's ideal time
    coded = plan(options, PlanInput(KV_2K, time_left, GBIT))
    assert coded.option is int4 and not coded.meets_deadline  # the coders are too slow to meet it
    held = plan(options, PlanInput(KV_2K, time_left, GBIT, held=frozenset({"cachegen-1"})))
    assert held.option is int4  # no encoding, but the peer still decodes at 140 MB/s
    both = plan(options, PlanInput(KV_2K, time_left, GBIT, held=frozenset({"cachegen-1"}),
                                   peer_stores=frozenset({"cachegen-1"})))  # fmt: skip
    assert both.option is cg1 and both.meets_deadline  # the caller's option, measured speeds and all
    assert both.projected_s == pytest.approx(KV_2K / 6 / GBIT)  # only the link is left
    assert plan(options, PlanInput(KV_2K, None, GBIT, held=frozenset({"cachegen-1"}))).option is RAW
