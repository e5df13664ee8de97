"""Link bandwidth: a moving estimate per peer link, fed by a transfer's own acknowledged bytes.

A transfer keeps a few chunks in flight, so the time a chunk "took" is not
its send-to-ack time: chunks overlap. :class:`AckClock` charges each
acknowledged chunk only the interval since the previous acknowledgement (or
since the chunk was sent, if the link sat idle in between), which is the
time the link spent carrying it while the pipe was full. :class:`LinkEstimator`
smooths those samples with an exponentially weighted moving average over
time (half-life ``half_life_s``), so a link whose bandwidth halves is
re-estimated within a few half-lives, and long samples weigh more than
short ones.
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

    def __init__(self, half_life_s: float = 0.5, initial_bytes_per_s: float | None = None) -> None:
        if not half_life_s > 0:
            raise InvalidInput("half_life_s must be > 0")
        if initial_bytes_per_s is not None and not initial_bytes_per_s > 0:
            raise InvalidInput("initial_bytes_per_s must be > 0")
        self.half_life_s = half_life_s
        self._rate = initial_bytes_per_s
        self._samples = 0
        self._bytes = 0

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
