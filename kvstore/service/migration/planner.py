"""The per-chunk codec planner: the least lossy codec that meets the deadline, or "recompute".

Before each chunk a transfer asks :func:`plan` which codec to send it with,
given what is left (raw bytes, seconds to the deadline), the link's current
estimate and, per candidate codec, its measured compression ratio and
encode/decode throughput on this machine. Encoding, sending and decoding of
successive chunks overlap (they are pipelined), so the projected time of
the rest of the transfer with one codec is its slowest stage::

    projected = max(left / ratio / bandwidth, left / encode_Bps, left / decode_Bps)

Given the chunks left, the link's round trip and the window
(``PlanInput.chunks_left``, ``rtt_s``, ``window``), the projection also
counts what does not overlap, and what the window allows::

    per chunk:  c_send, c_enc, c_dec = each stage's time for one chunk
    steady    = max(send, encode, decode, chunks * (c_send + rtt + c_dec) / window)
    projected = steady + c_enc + c_dec + rtt

(the first chunk is encoded before the link carries anything; the last is
checked and stored by the peer and its acknowledgement comes back after the
link is done; a window of chunks in flight carries at most ``window`` chunks
per send + round trip + peer time). Without ``chunks_left`` the projection is
the slowest stage alone.

A chunk already held encoded in a candidate's codec (a tier stores that
container) costs that candidate no encoding, and a peer that stores the
candidate's containers as they arrive (docs/protocol.md, HAVE ``stores``)
costs it no decoding: ``PlanInput.held`` and ``PlanInput.peer_stores`` name
those candidates, whose coder stage then drops out of the projection.

Candidates are tried from the least lossy (``quality_rank`` 0: raw,
lossless) to the most; the first whose projection fits the time left wins,
ties in rank going to the faster. When none fits, the fastest candidate is
chosen (it misses by the least) and the plan says whether recomputing the
KV (a prefill-time estimate the caller passed in) would be cheaper than
sending it. Bandwidth may change mid-transfer: planning again per chunk with
the latest estimate follows it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from kvstore.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class CodecOption:
    """One way to send a chunk, with what it costs here.

    Attributes:
        label: short name shown in progress ("raw", "int8", "cachegen-2").
        codec: the registered codec name ("raw" sends the bytes without a container).
        params: the codec's parameters.
        quality_rank: 0 for lossless; higher is lossier.
        ratio: raw bytes / sent bytes (>= some small positive number).
        encode_bytes_per_s, decode_bytes_per_s: raw bytes per second through the coder
            (``math.inf`` for raw).
        container_params: the params its containers carry (as measured; None: unknown or raw),
            to match containers a tier holds or a peer stores.
    """

    label: str
    codec: str
    params: Mapping[str, int | float | str | bool] = field(default_factory=dict)
    quality_rank: int = 0
    ratio: float = 1.0
    encode_bytes_per_s: float = math.inf
    decode_bytes_per_s: float = math.inf
    container_params: Mapping[str, int | float | str | bool] | None = None

    def __post_init__(self) -> None:
        if not self.ratio > 0 or not self.encode_bytes_per_s > 0 or not self.decode_bytes_per_s > 0:
            raise InvalidInput(f"codec option {self.label!r} needs a positive ratio and throughputs")
        if self.quality_rank < 0:
            raise InvalidInput("quality_rank must be >= 0")

    def projected_s(self, raw_bytes: int, bytes_per_s: float, chunks: int | None = None, rtt_s: float = 0.0,
                    window: int | None = None) -> float:
        """Seconds to move ``raw_bytes`` with this codec over a link of ``bytes_per_s`` (pipelined).

        With ``chunks`` (the number of chunks those bytes are in), the pipeline's fill and drain,
        the last acknowledgement's ``rtt_s`` and the ``window`` of chunks in flight are counted
        too (see the module docstring).
        """
        send = raw_bytes / self.ratio / bytes_per_s
        enc, dec = raw_bytes / self.encode_bytes_per_s, raw_bytes / self.decode_bytes_per_s
        steady = max(send, enc, dec)
        if chunks is None:
            return steady
        n = max(chunks, 1)
        if window is not None:
            steady = max(steady, n * (send / n + rtt_s + dec / n) / window)
        return steady + enc / n + dec / n + rtt_s


@dataclass(frozen=True, slots=True)
class PlanInput:
    """What the planner knows before a chunk.

    Attributes:
        bytes_left: raw bytes still to send, this chunk included.
        time_left_s: seconds to the deadline (None: no deadline; may be <= 0 once missed).
        bytes_per_s: the link estimate (None: unknown yet).
        recompute_s: the caller's estimate of recomputing the KV instead (None: not an option).
        held: labels of the candidates whose container of this chunk a local tier holds (no encoding).
        peer_stores: labels of the candidates whose containers the peer stores as they arrive
            (no decoding).
        chunks_left: chunks still to send, this one included (None: project the slowest stage
            alone, without fill, drain, round trip or window).
        rtt_s: the link's round trip (a request without payload), counted once per chunk in the
            window and once for the last acknowledgement.
        window: chunks in flight at once (None: unbounded).
    """

    bytes_left: int
    time_left_s: float | None
    bytes_per_s: float | None
    recompute_s: float | None = None
    held: frozenset[str] = frozenset()
    peer_stores: frozenset[str] = frozenset()
    chunks_left: int | None = None
    rtt_s: float = 0.0
    window: int | None = None

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or (self.window is not None and self.window < 1):
            raise InvalidInput("rtt_s must be >= 0 and window >= 1")
        if self.chunks_left is not None and self.chunks_left < 0:
            raise InvalidInput("chunks_left must be >= 0")

    def projected_s(self, option: CodecOption, bytes_per_s: float) -> float:
        return option.projected_s(self.bytes_left, bytes_per_s, self.chunks_left, self.rtt_s, self.window)


@dataclass(frozen=True, slots=True)
class Plan:
    """The planner's answer for one chunk.

    Attributes:
        option: the codec to send the chunk with.
        projected_s: projected seconds for the rest of the transfer with it (None: no estimate yet).
        meets_deadline: the projection fits the time left (True without a deadline).
        recompute_cheaper: no codec meets the deadline and recomputing is projected faster.
    """

    option: CodecOption
    projected_s: float | None
    meets_deadline: bool
    recompute_cheaper: bool


def plan(options: Sequence[CodecOption], inp: PlanInput) -> Plan:
    """Pick the codec for the next chunk (see the module docstring).

    Within one quality rank the candidate with the shortest projection is
    preferred. Without a deadline the least lossy rank is used; before the
    link has an estimate, the least lossy and fastest-coding candidate.

    Raises:
        InvalidInput: no candidates.
    """
    if not options:
        raise InvalidInput("the planner needs at least one codec option")
    if inp.held or inp.peer_stores:
        costed = [_costed(o, inp) for o in options]
        chosen = plan(costed, replace(inp, held=frozenset(), peer_stores=frozenset()))
        return replace(chosen, option=next(o for o, c in zip(options, costed) if c is chosen.option))
    ranks = sorted({o.quality_rank for o in options})
    bw = inp.bytes_per_s
    if bw is None or not bw > 0:
        first = [o for o in options if o.quality_rank == ranks[0]]
        return Plan(max(first, key=_coder_speed), None, True, False)
    for rank in ranks:
        best = min((o for o in options if o.quality_rank == rank), key=lambda o: inp.projected_s(o, bw))
        projected = inp.projected_s(best, bw)
        if inp.time_left_s is None or projected <= inp.time_left_s:
            return Plan(best, projected, True, False)
    fastest = min(options, key=lambda o: (inp.projected_s(o, bw), o.quality_rank))
    projected = inp.projected_s(fastest, bw)
    cheaper = inp.recompute_s is not None and inp.recompute_s < projected
    return Plan(fastest, projected, False, cheaper)


def _coder_speed(o: CodecOption) -> float:
    return min(o.encode_bytes_per_s, o.decode_bytes_per_s)


def _costed(o: CodecOption, inp: PlanInput) -> CodecOption:
    """``o`` without the coder stages a held container or a storing peer saves."""
    enc = math.inf if o.label in inp.held else o.encode_bytes_per_s
    dec = math.inf if o.label in inp.peer_stores else o.decode_bytes_per_s
    return o if (enc, dec) == (o.encode_bytes_per_s, o.decode_bytes_per_s) else replace(
        o, encode_bytes_per_s=enc, decode_bytes_per_s=dec)
