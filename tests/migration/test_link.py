"""The link bandwidth estimator and the acknowledgement clock, with synthetic samples."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidInput
from kvstore.service.migration.link import AckClock, LinkEstimator, LinkTable

MB = 1e6


def test_first_sample_sets_the_estimate_then_it_moves_toward_new_rates() -> None:
    est = LinkEstimator(half_life_s=0.5)
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
