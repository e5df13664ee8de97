"""Link bandwidth: a moving estimate per peer link, fed by a transfer's own acknowledged bytes.

A transfer keeps a few chunks in flight, so the time a chunk "took" is not
its send-to-ack time: chunks overlap. :class:`AckClock` charges each
acknowledged chunk only the interval since the previous acknowledgement (or
since the chunk was sent, if the link sat idle in between), which is the
time the link spent carrying it while the pipe was full. :class:`LinkEstimator`
smooths those samples with an exponentially weighted moving average over
time (half-life ``half_life_s``), so a link whose bandwidth halves is
re-estimated within a few half-lives, and long samples weigh more than
short ones. A drop is noticed faster than the average alone would: after
``drop_samples`` samples in a row below ``drop_ratio`` of the estimate, the
estimate is those samples' rate (a link whose bandwidth halves mid-transfer
is re-estimated within a chunk or two; a rise is followed by the average).

:class:`CoderRates` learns, the same way, what each codec really costs in a
transfer: the sender's stage per chunk (reading it, encoding it or reading
its stored container) and the peer's (its checks and decoding, XPUT's
``decode_s`` and ``store_s``), seeded by the one-time measurement on an idle thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from kvstore.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """A link's estimated goodput.

    Attributes:
        bytes_per_s: the moving estimate, or None before the first sample.
        samples: acknowledged chunks that fed it.
        bytes_total: bytes those chunks carried.
    """

    bytes_per_s: float | None
    samples: int
    bytes_total: int


class LinkEstimator:
    """EWMA of (bytes / busy seconds), weighted by each sample's duration.

    Invariant: ``bytes_per_s`` is None until a sample arrives, then always
    finite and > 0.
    """

    def __init__(self, half_life_s: float = 0.5, initial_bytes_per_s: float | None = None,
                 drop_ratio: float | None = 0.75, drop_samples: int = 2) -> None:
        if not half_life_s > 0:
            raise InvalidInput("half_life_s must be > 0")
        if initial_bytes_per_s is not None and not initial_bytes_per_s > 0:
            raise InvalidInput("initial_bytes_per_s must be > 0")
        if drop_ratio is not None and not 0 < drop_ratio < 1 or drop_samples < 1:
            raise InvalidInput("drop_ratio must be in (0, 1) (or None) and drop_samples >= 1")
        self.half_life_s = half_life_s
        self.drop_ratio = drop_ratio
        self.drop_samples = drop_samples
        self._rate = initial_bytes_per_s
        self._samples = 0
        self._bytes = 0
        self._low: list[tuple[int, float]] = []  # the samples in a row below drop_ratio x the estimate

    def observe(self, nbytes: int, seconds: float) -> None:
        """Feed one acknowledged chunk: ``nbytes`` carried in ``seconds`` of link time.

        Raises:
            InvalidInput: negative bytes or a non-positive duration.
        """
        if nbytes < 0 or not seconds > 0 or not math.isfinite(seconds):
            raise InvalidInput(f"a link sample needs bytes >= 0 and seconds > 0, got {nbytes}, {seconds}")
        sample = nbytes / seconds
        self._samples += 1
        self._bytes += nbytes
        if self._rate is None:
            self._rate = sample
            return
        if self.drop_ratio is not None and sample < self.drop_ratio * self._rate:
            self._low.append((nbytes, seconds))
            if len(self._low) >= self.drop_samples:
                low_bytes, low_s = sum(b for b, _ in self._low), sum(t for _, t in self._low)
                self._rate, self._low = max(low_bytes / low_s, 1.0), []
                return
        else:
            self._low = []
        keep = 0.5 ** (seconds / self.half_life_s)
        self._rate = max(keep * self._rate + (1 - keep) * sample, 1.0)

    @property
    def estimate(self) -> LinkEstimate:
        return LinkEstimate(self._rate, self._samples, self._bytes)


class AckClock:
    """Turns (sent at, acknowledged at) of pipelined chunks into link-time samples.

    A chunk sent while the link sat idle (a slow coder left gaps between
    chunks) waited from its send to its acknowledgement for more than the
    link: the round trip of a request without payload (``rtt_s``) and the
    peer's work on it (``busy_s``: decoding). Neither is link time, so both
    are taken out of such a sample (keeping at least a quarter of it);
    otherwise a transfer of small compressed chunks would measure its round
    trips, underestimate the link and keep choosing lossier codecs.
    """

    def __init__(self, estimator: LinkEstimator, rtt_s: float = 0.0) -> None:
        if rtt_s < 0:
            raise InvalidInput("rtt_s must be >= 0")
        self.estimator = estimator
        self.rtt_s = rtt_s
        self._last_ack: float | None = None

    def acked(self, nbytes: int, sent_at: float, now: float | None = None, busy_s: float = 0.0) -> None:
        now = time.monotonic() if now is None else now
        idle = self._last_ack is None or sent_at >= self._last_ack
        start = sent_at if idle or self._last_ack is None else self._last_ack
        self._last_ack = now
        seconds = now - start
        if idle:
            seconds = max(seconds - self.rtt_s - max(busy_s, 0.0), seconds / 4)
        if seconds > 0:
            self.estimator.observe(nbytes, seconds)


class LinkTable:
    """One estimator per peer link (by peer URL), kept across transfers to that peer."""

    def __init__(self, half_life_s: float = 0.5) -> None:
        self.half_life_s = half_life_s
        self._links: dict[str, LinkEstimator] = {}

    def link(self, peer: str) -> LinkEstimator:
        found = self._links.get(peer)
        if found is None:
            found = self._links[peer] = LinkEstimator(self.half_life_s)
        return found

    def snapshot(self) -> dict[str, LinkEstimate]:
        return {peer: est.estimate for peer, est in self._links.items()}


class CoderRates:
    """Moving estimates of each codec's throughput in transfers, per stage (see the module docstring).

    Keys are (option label, whether the stage was skipped by a held container or a peer that stores
    it as it arrives): a held cachegen chunk still costs a read, a stored-as-is one still a check.
    Each estimate is raw bytes per second, from an exponential average of seconds per byte over chunks (``weight`` for the
    newest). Invariant: every estimate is finite and > 0.
    """

    def __init__(self, weight: float = 0.5, stale_after: int = 4) -> None:
        if not 0 < weight <= 1 or stale_after < 1:
            raise InvalidInput("weight must be in (0, 1] and stale_after >= 1")
        self.weight = weight
        self.stale_after = stale_after
        self._send: dict[tuple[str, bool], float] = {}
        self._peer: dict[tuple[str, bool], float] = {}
        self._passed: dict[tuple[str, bool, bool], int] = {}  # chunks in a row an option was passed over
        self._samples: dict[tuple[bool, tuple[str, bool]], int] = {}  # samples fed per (sender?, key), ever
        self._slip = 1.0

    def sent(self, label: str, skipped: bool, raw_bytes: int, seconds: float) -> None:
        """The sender's stage of one chunk: ``seconds`` of wall time to have it ready to send."""
        self._feed(self._send, (label, skipped), raw_bytes, seconds)

    def stored(self, label: str, skipped: bool, raw_bytes: int, seconds: float) -> None:
        """The peer's work on one chunk (XPUT's ``decode_s`` + ``store_s``)."""
        self._feed(self._peer, (label, skipped), raw_bytes, seconds)

    @property
    def slip(self) -> float:
        """How much longer than projected pushes took: actual / projected time from the first chunk on.

        A moving average over transfers (1.0 before the first), within [1, 3]: what the stages'
        estimates still miss (CPU time the machine's other work takes, the peer's stores).
        """
        return self._slip

    def finished(self, projected_s: float, actual_s: float) -> None:
        """One push's projection at its first chunk against the time it then took."""
        if not projected_s > 0 or not actual_s > 0 or not math.isfinite(projected_s + actual_s):
            return
        sample = min(max(actual_s / projected_s, 1.0), 3.0)
        self._slip = (1 - self.weight) * self._slip + self.weight * sample

    def relax(self, label: str, held: bool, peer: bool, factor: float = 0.9) -> None:
        """An option passed over for a chunk: its learned times shrink by ``factor``; one resting on a
        single sample is forgotten after ``stale_after`` chunks in a row passed over.

        A slow first sample (a cold read, a busy moment) would otherwise keep an option from being
        chosen, and so from being timed again: shrinking by 0.9 a chunk takes some 20 chunks to undo
        a sample 10x too slow. Forgotten, the option is costed as one not timed yet (its measurement
        here), so it is tried again where that says it is best and timed a second time; from then on
        it is only relaxed, so an option that is really slow costs at most one chunk more.
        """
        state = (label, held, peer)
        passed = self._passed[state] = self._passed.get(state, 0) + 1
        for table, key in ((self._send, (label, held)), (self._peer, (label, peer))):
            if key not in table:
                continue
            if passed >= self.stale_after and self._samples.get((table is self._send, key), 0) < 2:
                del table[key]
            else:
                table[key] *= factor

    def chosen(self, label: str, held: bool, peer: bool) -> None:
        """An option chosen for a chunk: its run of chunks passed over ends."""
        self._passed.pop((label, held, peer), None)

    def send_rate(self, label: str, skipped: bool) -> float | None:
        found = self._send.get((label, skipped))
        return None if found is None else 1.0 / found

    def peer_rate(self, label: str, skipped: bool) -> float | None:
        found = self._peer.get((label, skipped))
        return None if found is None else 1.0 / found

    def _feed(self, table: dict[tuple[str, bool], float], key: tuple[str, bool], raw_bytes: int,
              seconds: float) -> None:
        if raw_bytes <= 0 or not math.isfinite(seconds) or seconds < 0:
            raise InvalidInput(f"a coder sample needs bytes > 0 and seconds >= 0, got {raw_bytes}, {seconds}")
        sample = max(seconds, 1e-6) / raw_bytes  # seconds per byte: averaged as times, not as rates
        count = (table is self._send, key)
        self._samples[count] = self._samples.get(count, 0) + 1
        old = table.get(key)
        table[key] = sample if old is None else (1 - self.weight) * old + self.weight * sample
