"""The per-chunk codec planner with synthetic link and codec numbers."""

from __future__ import annotations

import math
import time

import pytest

from kvstore.errors import InvalidInput
from kvstore.service.migration.link import CoderRates
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


def test_fill_drain_round_trips_and_window_are_counted() -> None:
    n, rtt = 8, 0.02
    chunk = KV_2K // n
    # raw: no coding; the link's time, then the last acknowledgement's round trip
    assert RAW.projected_s(KV_2K, GBIT, n, rtt, 4) == pytest.approx(KV_2K / GBIT + rtt)
    # int8: the first chunk's encoding and the last one's decoding do not overlap anything
    want = KV_2K / 1.9 / GBIT + chunk / (600 * MB) + chunk / (900 * MB) + rtt
    assert INT8.projected_s(KV_2K, GBIT, n, rtt, 4) == pytest.approx(want)
    # small chunks and a long round trip: a window of 1 carries one chunk per send + round trip
    tiny = CG.projected_s(KV_2K, GBIT, n, 0.1, 1)
    assert tiny >= n * 0.1
    # a deadline the bare link fits but the honest projection does not: the planner goes lossier
    bare = INT8.projected_s(KV_2K, GBIT)
    inp = PlanInput(KV_2K, bare * 1.02, GBIT, chunks_left=n, rtt_s=rtt, window=4)
    assert plan([RAW, INT8, CG], PlanInput(KV_2K, bare * 1.02, GBIT)).option is INT8
    assert plan([RAW, INT8, CG], inp).option is CG
    with pytest.raises(InvalidInput):
        PlanInput(1, 1.0, 1.0, rtt_s=-1)
    with pytest.raises(InvalidInput):
        PlanInput(1, 1.0, 1.0, window=0)


def test_learned_coder_speeds_replace_the_idle_measurement() -> None:
    from kvstore.service.migration.link import CoderRates
    from kvstore.service.migration.transfer import effective_options

    rates = CoderRates()
    options = [RAW, INT8, CG]
    seeded = effective_options(options, rates, frozenset({"cachegen-2"}), frozenset({"cachegen-2"}))
    assert seeded[1].encode_bytes_per_s == INT8.encode_bytes_per_s  # nothing learned: the measurement
    assert math.isinf(seeded[2].encode_bytes_per_s) and math.isinf(seeded[2].decode_bytes_per_s)
    time_left = KV_2K / 1.9 / GBIT * 1.3
    inp = PlanInput(KV_2K, time_left, GBIT, chunks_left=8, rtt_s=0.02, window=4)
    assert plan(seeded, inp).option.label == "int8"  # int8 is projected to fit
    for _ in range(3):  # in transfers the sender's int8 stage ran at 90 MB/s (read, encode, a busy core)
        rates.sent("int8", False, KV_2K // 8, KV_2K / 8 / (90 * MB))
    rates.sent("cachegen-2", True, KV_2K // 8, 0.004)  # held: a read of the container
    rates.stored("cachegen-2", True, KV_2K // 8, 0.002)  # stored as it arrived: a check
    learned = effective_options(options, rates, frozenset({"cachegen-2"}), frozenset({"cachegen-2"}))
    assert learned[1].encode_bytes_per_s == pytest.approx(90 * MB)
    chosen = plan(learned, inp)
    assert chosen.option.label == "cachegen-2" and chosen.meets_deadline  # int8 no longer fits
    assert chosen.option.params == CG.params and chosen.option.ratio == CG.ratio


def test_halving_mid_transfer_is_followed_chunk_by_chunk() -> None:
    from kvstore.service.migration.link import LinkEstimator

    link, n, chunk = LinkEstimator(), 8, KV_2K // 8
    for _ in range(8):
        link.observe(chunk, chunk / GBIT)
    deadline = 1.5 * KV_2K / GBIT
    elapsed, chosen = 0.02, []
    for i in range(n):  # the link halves after the second chunk
        bw = link.estimate.bytes_per_s
        assert bw is not None
        p = plan(ALL, PlanInput(chunk * (n - i), deadline - elapsed, bw, chunks_left=n - i, rtt_s=0.02, window=4))
        chosen.append(p.option.label)
        rate = GBIT if i < 2 else GBIT / 2
        sent = chunk / p.option.ratio
        link.observe(int(sent), sent / rate)
        elapsed += sent / rate
    # chunks 2 and 3 were carried at half the rate; the estimate said so before chunk 4 was planned
    assert chosen[:4] == ["lossless"] * 4 and chosen[4] == "int8"
    assert elapsed <= deadline  # and back to the least lossy once the time left allows it
    assert chosen[-1] == "raw"


def test_an_untimed_coder_pays_the_timed_read_of_the_raw_chunk() -> None:
    from kvstore.service.migration.link import CoderRates
    from kvstore.service.migration.transfer import READ_STAGE, effective_options

    rates = CoderRates()
    rates.sent(READ_STAGE, False, 6_000_000, 6_000_000 / (600 * MB))  # reading a chunk here: 600 MB/s
    raw, int8 = effective_options([RAW, INT8], rates, frozenset(), frozenset())
    assert raw.encode_bytes_per_s == pytest.approx(600 * MB)  # raw still reads
    assert int8.encode_bytes_per_s == pytest.approx(1 / (1 / (600 * MB) + 1 / (600 * MB)))  # read, then encode


def _llama_push_chunks(coders: CoderRates, first_cachegen_s: float, chunks: int) -> list[str]:
    """Plan ``chunks`` 32 MiB chunks of pushes with an impossible deadline, as a push does; each chosen
    option is timed at its true speed, except cachegen's first timing (``first_cachegen_s``)."""
    from kvstore.keys import Namespace
    from kvstore.service.migration.link import LinkEstimator
    from kvstore.service.migration.progress import TransferProgress
    from kvstore.service.migration.transfer import READ_STAGE, Ahead, TransferRequest, _plan
    from kvstore.spec import KVSpec, ModelFingerprint

    size = 32 << 20
    ns = Namespace("t", KVSpec(ModelFingerprint("llama-like"), 32, 8, 128), chunk_tokens=256)
    cg = CodecOption("cachegen-1", "cachegen", {"level": 1}, 2, ratio=4.0, encode_bytes_per_s=100 * MB,
                     decode_bytes_per_s=150 * MB, container_params={"level": 1})  # fmt: skip
    req = TransferRequest("kvstore://peer:1", ns, (), deadline_s=0.01, codec_options=(RAW, cg), window=4)
    progress = TransferProgress("t", "push", "kvstore://peer:1", ns.id.hex(), "t", "auto", chunks)
    link = LinkEstimator(initial_bytes_per_s=GBIT)
    true_send = {"raw": 0.02, "cachegen-1": 0.03}  # a read of the raw chunk, then of the held container
    chosen = []
    for n in range(chunks):
        coders.sent(READ_STAGE, False, size, 0.02)
        held = peer = frozenset({"cachegen-1"})
        label = _plan(req, progress, link, Ahead(size * 4, 4, 0.02), time.monotonic(), held, peer, coders).option.label
        seconds = first_cachegen_s if label == "cachegen-1" and "cachegen-1" not in chosen else true_send[label]
        coders.sent(label, label in held, size, seconds)
        coders.stored(label, label in peer, size, 0.01)
        chosen.append(label)
    return chosen


def test_one_slow_first_timing_does_not_keep_a_codec_from_being_tried_again() -> None:
    # the regression of 32 MiB chunks with an impossible deadline: a cold first read of a held
    # cachegen container (2 s) made it look slower than raw for some 20 chunks
    chosen = _llama_push_chunks(CoderRates(), first_cachegen_s=2.0, chunks=12)
    assert chosen[0] == "cachegen-1"  # its measurement says it is fastest
    assert "cachegen-1" in chosen[1:6]  # retried within stale_after + 1 chunks, timed again ...
    assert chosen[-4:] == ["cachegen-1"] * 4  # ... and kept, at its true speed
    assert chosen.count("cachegen-1") >= 8


def test_an_option_slow_twice_is_not_retried_again_and_again() -> None:
    rates = CoderRates(stale_after=4)
    for _ in range(2):
        rates.sent("int8", False, 1_000_000, 1.0)  # 1 MB/s, twice: it is slow
    for _ in range(10):
        rates.relax("int8", False, False)
    assert rates.send_rate("int8", False) is not None  # only relaxed, never forgotten
    once = CoderRates(stale_after=4)
    once.sent("int8", False, 1_000_000, 1.0)
    for _ in range(3):
        once.relax("int8", False, False)
    assert once.send_rate("int8", False) is not None
    once.relax("int8", False, False)
    assert once.send_rate("int8", False) is None  # one sample, passed over 4 times: forgotten
