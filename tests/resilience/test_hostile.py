"""Hostile input: drawn frames against a live daemon's data plane, container fuzzing, schemathesis.

The data plane gets frames drawn by hypothesis (every request type and
unknown ones, headers of known and unknown fields with values of every
msgpack type, real namespace ids and keys mixed in) and raw junk; every case
must end in a typed reply or a close after an error, within a bounded time,
with no INTERNAL error, and the daemon must still serve correct bytes with a
bounded resident size afterwards. Fast run: 300 drawn + 3,000 mutated valid requests;
``-m slow``: 20,000 drawn + 100,000 mutated.

The container decoder is fuzzed by tests/codecs/test_fuzz.py in the default
run (over 10,000 cases); the slow run here drives its mutators to over
100,000 cases. Schemathesis runs against /openapi.json when it is installed.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from kvstore.service.protocol import namespace_to_wire
from tests.resilience.common import (
    RESULTS_ENV,
    TENANT_TOKENS,
    client,
    daemon,
    key_of,
    payload,
    record,
    verify_all,
)
from tests.resilience.wire_fuzz import Context, Prober, Tally, frames, mutated
from tests.service.daemon_fixtures import ADMIN_TOKEN, DaemonProc, namespace, running

RSS_GROWTH_LIMIT = 256 << 20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def run_wire_fuzz(tmp_path: Path, drawn: int, mutations: int) -> None:
    tally = Tally()
    for d in running(daemon(tmp_path, "--cpu-bytes", "32MiB", "--no-disk")):
        ns = namespace("tenant-a")
        with client(d) as c:
            c.register(ns)
            keys = [key_of("fuzz", i) for i in range(8)]
            c.put_many(ns, keys, [payload(k) for k in keys])
        assert d.proc is not None
        rss0 = _rss(d.proc.pid)
        ctx = Context(ns.id, list(keys), namespace_to_wire(ns))
        prober = Prober(d.port, TENANT_TOKENS["tenant-a"], ctx.spec)

        @settings(max_examples=drawn, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(frames(ctx))
        def one(case: tuple[str, bytes]) -> None:
            prober.check(case[0], case[1], tally)  # noqa: B023  # one loop pass

        t0, rng = time.monotonic(), random.Random(drawn + mutations)
        try:
            one()
            for _ in range(mutations):
                prober.check(*mutated(ctx, rng), tally)
        finally:
            prober.close()
        elapsed = time.monotonic() - t0
        _still_serving(d, keys)
        grew = _rss(d.proc.pid) - rss0
        assert grew < RSS_GROWTH_LIMIT, f"the daemon grew by {grew >> 20} MiB under fuzzing"
        assert tally.cases >= (drawn + mutations) * 0.9, tally
        record("hostile", f"data-plane frames against a live daemon: {drawn} drawn by hypothesis, {mutations} mutated "
               "valid requests, raw junk", tally.cases,
               tally.cases, f"{tally.errors} typed errors, {tally.closes} closes, 0 internal errors, slowest "
               f"{tally.slowest_s * 1e3:.0f} ms, RSS +{grew >> 20} MiB, {elapsed:.0f} s; still serving")


def _still_serving(d: DaemonProc, keys: Sequence[bytes]) -> None:
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    with client(d) as c:
        ns = c.register(namespace("tenant-a"))
        assert c.ping() >= 0
        verify_all(c, ns, list(keys))  # what is still there (fuzzed DELETEs may have removed some) is right
        more = [key_of("after-fuzz", i) for i in range(4)]
        assert all(c.put_many(ns, more, [payload(k) for k in more]))
        assert verify_all(c, ns, more) == (4, 0)
    assert d.call("GET", "/healthz").status == 200


def test_wire_fuzz_fast(tmp_path: Path) -> None:
    run_wire_fuzz(tmp_path, drawn=300, mutations=3000)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_wire_fuzz_100k(tmp_path: Path) -> None:
    run_wire_fuzz(tmp_path, drawn=20_000, mutations=100_000)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_container_fuzz_100k() -> None:
    from tests.codecs import test_fuzz as fz

    rng, stats = random.Random(9), fz.Stats()
    bases = [fz.Base(n, p, layout, seed) for seed, (n, p, layout) in enumerate(fz.CODECS)]
    per = 100_000 // (2 * len(bases)) + 1
    for base in bases:
        for what, buf in fz.flips(base, rng, per):
            fz.check(base, buf, stats, what)
        for what, buf in fz.splices(base, rng, per):
            fz.check(base, buf, stats, what)
    assert stats.cases >= 100_000 and stats.rejected >= stats.cases * 0.9
    record("hostile", "container decoder: bit flips and splices (tests/codecs/test_fuzz.py mutators)",
           stats.cases, stats.cases, f"{stats.rejected} rejected with CodecError, {stats.decoded} decoded "
           f"correctly, slowest {stats.slowest * 1e3:.0f} ms")


CROSS_FIELD = ("tp_rank", "pp_rank")
"""What JSON Schema cannot say, so the document leaves to the server: a rank below its size (400)."""


@pytest.mark.parametrize("examples", [pytest.param(3, id="fast"),
                                      pytest.param(200, id="200", marks=[pytest.mark.slow, pytest.mark.timeout(3600)])])
def test_schemathesis_admin_api(tmp_path: Path, examples: int) -> None:
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
    from tests.resilience.openapi_fuzz import run_schemathesis

    for d in running(daemon(tmp_path)):  # cpu and disk tiers: moves have a valid source and target
        d.register("tenant-a", TENANT_TOKENS["tenant-a"])
        n, failures, looser = run_schemathesis(schemathesis, d, ADMIN_TOKEN, max_examples=examples)
        print("schema-valid requests the server rejects (400):", *sorted(looser), sep="\n  ")
        if os.environ.get(RESULTS_ENV):
            out = Path(os.environ[RESULTS_ENV])
            out.mkdir(parents=True, exist_ok=True)
            (out / "schemathesis-400s.txt").write_text("\n".join(sorted(looser)) + "\n")
        assert d.call("GET", "/healthz").status == 200
        assert not failures, "\n".join(failures[:10])
        unexpected = [x for x in looser if not any(f"'{f}'" in x or f"{f} " in x for f in CROSS_FIELD)]
        assert not unexpected, "the document accepts what the server rejects:\n" + "\n".join(sorted(unexpected))
        record("hostile", "schemathesis against /openapi.json (admin token, every operation)", n, n,
               f"no 5xx, replies match the document; no schema-valid body refused but {len(looser)} with a rank "
               "not below its size (tp_rank < tp_size: JSON Schema cannot compare fields); daemon healthy")
