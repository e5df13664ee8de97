"""The link bandwidth estimator and the acknowledgement clock, with synthetic samples."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidInput
from kvstore.service.migration.link import AckClock, CoderRates, LinkEstimator, LinkTable

MB = 1e6


def test_first_sample_sets_the_estimate_then_it_moves_toward_new_rates() -> None:
    est = LinkEstimator(half_life_s=0.5, drop_ratio=None)  # the average alone
    assert est.estimate.bytes_per_s is None
    est.observe(int(125 * MB * 0.1), 0.1)
    assert est.estimate.bytes_per_s == pytest.approx(125 * MB)
    for _ in range(20):  # the link halves: 2 s of samples at 62.5 MB/s
        est.observe(int(62.5 * MB * 0.1), 0.1)
    # four half-lives later one sixteenth of the old rate's excess is left
    assert est.estimate.bytes_per_s == pytest.approx(62.5 * MB + 62.5 * MB / 16)
    assert est.estimate.samples == 21


def test_longer_samples_weigh_more() -> None:
    a, b = LinkEstimator(1.0, 100 * MB), LinkEstimator(1.0, 100 * MB)
    a.observe(int(50 * MB * 0.01), 0.01)
    b.observe(int(50 * MB * 1.0), 1.0)
    assert a.estimate.bytes_per_s is not None and b.estimate.bytes_per_s is not None
    assert a.estimate.bytes_per_s > 99 * MB and b.estimate.bytes_per_s == pytest.approx(75 * MB)


def test_ack_clock_charges_pipelined_chunks_only_the_gap_since_the_last_ack() -> None:
    est = LinkEstimator(half_life_s=10.0)
    clock = AckClock(est)
    # four 1 MB chunks sent at once on a 10 MB/s link: acks every 0.1 s
    for i in range(4):
        clock.acked(1_000_000, sent_at=0.0, now=0.1 * (i + 1))
    assert est.estimate.bytes_per_s == pytest.approx(10 * MB)
    # an idle pause: the next chunk is charged from its own send time, not the last ack
    clock.acked(1_000_000, sent_at=5.0, now=5.1)
    assert est.estimate.bytes_per_s == pytest.approx(10 * MB)


def test_bad_samples_are_refused_and_links_are_kept_per_peer() -> None:
    est = LinkEstimator()
    with pytest.raises(InvalidInput):
        est.observe(10, 0.0)
    with pytest.raises(InvalidInput):
        est.observe(-1, 1.0)
    with pytest.raises(InvalidInput):
        LinkEstimator(half_life_s=0)
    table = LinkTable()
    table.link("kvstore://a:1").observe(1000, 1.0)
    assert table.link("kvstore://a:1") is table.link("kvstore://a:1")
    assert table.snapshot()["kvstore://a:1"].bytes_per_s == 1000
    assert table.link("kvstore://b:1").estimate.bytes_per_s is None


def test_a_halved_link_is_noticed_within_two_chunks() -> None:
    est = LinkEstimator(half_life_s=0.5)
    for _ in range(10):  # 5.9 MB chunks at 125 MB/s
        est.observe(5_900_000, 5_900_000 / (125 * MB))
    est.observe(5_900_000, 5_900_000 / (62.5 * MB))  # one slow chunk: may be noise, the average moves
    first = est.estimate.bytes_per_s
    assert first is not None and 100 * MB < first < 125 * MB
    est.observe(5_900_000, 5_900_000 / (62.5 * MB))  # the second in a row: the link is slower
    assert est.estimate.bytes_per_s == pytest.approx(62.5 * MB)
    for _ in range(2):  # a rise is followed by the average, not at once
        est.observe(5_900_000, 5_900_000 / (125 * MB))
    rising = est.estimate.bytes_per_s
    assert rising is not None and 62.5 * MB < rising < 110 * MB


def test_one_slow_sample_between_fast_ones_does_not_snap_the_estimate() -> None:
    est = LinkEstimator(half_life_s=0.5, initial_bytes_per_s=125 * MB)
    for _ in range(5):
        est.observe(5_900_000, 5_900_000 / (40 * MB))
        est.observe(5_900_000, 5_900_000 / (125 * MB))
    low = est.estimate.bytes_per_s
    assert low is not None and low > 70 * MB  # averaged, never reset to 40 MB/s
    with pytest.raises(InvalidInput):
        LinkEstimator(drop_ratio=1.5)


def test_coder_rates_learn_each_stage_per_codec_and_skip() -> None:
    rates = CoderRates(weight=0.5)
    assert rates.send_rate("int8", False) is None and rates.peer_rate("int8", False) is None
    rates.sent("int8", False, 6_000_000, 0.03)  # 200 MB/s (a shared core, not the idle 320)
    rates.sent("int8", False, 6_000_000, 0.06)  # 100 MB/s: averaged as times, 0.045 s
    assert rates.send_rate("int8", False) == pytest.approx(6_000_000 / 0.045)
    rates.sent("cachegen-1", True, 6_000_000, 0.006)  # held: a read of the container
    assert rates.send_rate("cachegen-1", True) == pytest.approx(1e9)
    assert rates.send_rate("cachegen-1", False) is None  # encoding it is another stage
    rates.stored("cachegen-1", True, 6_000_000, 0.0)  # a check too quick to time still counts as finite
    found = rates.peer_rate("cachegen-1", True)
    assert found is not None and found > 1e9
    with pytest.raises(InvalidInput):
        rates.sent("int8", False, 0, 0.1)
    with pytest.raises(InvalidInput):
        CoderRates(weight=0)


def test_slip_learns_how_much_longer_pushes_took_than_projected() -> None:
    rates = CoderRates(weight=0.5)
    assert rates.slip == 1.0
    rates.finished(0.40, 0.60)  # 1.5x
    assert rates.slip == pytest.approx(1.25)
    rates.finished(0.40, 0.30)  # quicker than projected counts as on time: projections never shrink
    assert rates.slip == pytest.approx(1.125)
    rates.finished(0.10, 5.0)  # an outlier (a stall) is capped
    assert rates.slip == pytest.approx((1.125 + 3.0) / 2)
    rates.finished(0.0, 1.0)  # nothing projected: ignored
    assert rates.slip == pytest.approx((1.125 + 3.0) / 2)


def test_an_option_timed_twice_and_passed_over_is_relaxed_until_it_is_tried_again() -> None:
    rates = CoderRates()
    for _ in range(2):  # two slow reads: 10 MB/s (one alone would be forgotten: test_planner.py)
        rates.sent("cachegen-1", True, 1_000_000, 0.1)
    for _ in range(10):
        rates.relax("cachegen-1", True, False, 0.9)
    found = rates.send_rate("cachegen-1", True)
    assert found == pytest.approx(10 * MB / 0.9**10)
    assert rates.peer_rate("cachegen-1", False) is None  # nothing learned stays nothing
