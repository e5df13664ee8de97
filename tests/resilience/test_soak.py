"""Sustained load with faults (tests/resilience/soak.py): 64 asyncio clients over 4 tenants.

Fast run: 20 s with a fault every 5 s (each of the four kinds once). ``-m slow``:
10 minutes with a fault every minute, as ``python -m tests.resilience.soak``.
Zero wrong answers, zero failed requests, zero leases, connections or
reservations left once the clients are gone, the daemon alive, and its memory
within budget plus the documented overhead (docs/daemon.md "Memory").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.redis_servers import REDIS_SERVER
from tests.resilience.common import record
from tests.resilience.soak import Soak, run

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")


def _soak(tmp_path: Path, s: Soak) -> None:
    out = run(s, tmp_path)
    worst = max(w["p99_ms"] for w in out["windows"])  # type: ignore[attr-defined]
    record("soak", f"{s.clients} asyncio clients over {s.tenants} tenants for {s.duration_s:.0f} s, a fault "
           f"every {s.fault_interval_s:.0f} s ({', '.join(out['faults'])})",  # type: ignore[arg-type]
           int(out["ops"]), int(out["ops"]) - int(out["wrong"]) - int(out["errors"]),  # type: ignore[call-overload]
           f"wrong {out['wrong']}, errors {out['errors']}, leaked leases {out['leaked_leases']}, worst p99 per "
           f"window {worst:.0f} ms, RSS {out['rss_start_mib']}->{out['rss_end_mib']} MiB; peak arena "
           f"{out['peak_mib']['arena']}, LMDB {out['peak_mib']['lmdb']}, overhead {out['peak_mib']['overhead']} "  # type: ignore[index]
           f"MiB (bound {out['bound_mib']['overhead']}), overhead growth over the run "  # type: ignore[index]
           f"{out['overhead_growth_mib']} MiB; left open after: "
           + ", ".join(f"{k} {v}" for k, v in out["left_after"].items()))  # type: ignore[attr-defined]
    print(json.dumps(out["windows"]))
    assert out["ok"], json.dumps(out)[:3000]
    assert len(out["faults"]) >= 1  # type: ignore[arg-type]


def test_soak_fast(tmp_path: Path) -> None:
    _soak(tmp_path, Soak(duration_s=20, clients=64, tenants=4, fault_interval_s=5, pause_s=2))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak_10_minutes(tmp_path: Path) -> None:
    _soak(tmp_path, Soak(duration_s=600, clients=64, tenants=4, fault_interval_s=60, pause_s=5))
