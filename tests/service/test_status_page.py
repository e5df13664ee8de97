"""The status page in headless Chromium shows the daemon's real numbers.

Chromium comes from Debian (``apt-get install -y chromium``); without it the
test is skipped with that reason. Chunks go through the data plane (the
Python client) when it is there, else through the admin API.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kvstore.keys import prefix_keys
from tests.service.daemon_fixtures import (
    ADMIN_TOKEN,
    HAVE_DATAPLANE,
    TOKEN_A,
    TOKENS,
    DaemonProc,
    chunk_bytes,
    namespace,
    running,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Dom(HTMLParser):
    """Elements with an id or a data-field: their data-value and text, tier cells keyed by (tier, field)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, tuple[str | None, str]] = {}
        self.cells: dict[tuple[str, str], tuple[str | None, str]] = {}
        self.attrs_of: dict[str, dict[str, str | None]] = {}
        self._open: list[tuple[str, dict[str, str | None], list[str]]] = []
        self._tier: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self._tier = a.get("data-tier")
        if "id" in a:
            self.attrs_of[str(a["id"])] = a
        if tag not in ("input", "meta", "br", "polyline"):
            self._open.append((tag, a, []))

    def handle_data(self, data: str) -> None:
        for _, _, text in self._open:
            text.append(data)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, a, text = self._open.pop()
            value = (a.get("data-value"), "".join(text).strip())
            if "id" in a:
                self.by_id[str(a["id"])] = value
            if "data-field" in a and self._tier is not None:
                self.cells[(self._tier, str(a["data-field"]))] = value
            if t == tag:
                break


def chromium(args: list[str], url: str, timeout: float = 60.0) -> str:
    with tempfile.TemporaryDirectory(prefix="kvs-chromium-") as profile:
        out = subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args, url],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _traffic(d: DaemonProc) -> None:
    """Real chunks through the store: 4 puts, a lookup that hits 3 of 5 chunks, 3 hits and 1 miss."""
    ns = namespace("tenant-a")
    tokens = list(range(64))
    keys = prefix_keys(ns, tokens)
    if HAVE_DATAPLANE:
        from kvstore.client.sync import Client

        with Client.connect(f"kvstore://127.0.0.1:{d.port}", token=TOKEN_A) as kv:
            kv.register(ns)
            for i, key in enumerate(keys[:3]):
                assert kv.put(ns, key, bytearray(chunk_bytes(i)))
            hit = kv.lookup(ns, tokens + list(range(16)))
            assert hit.hit_tokens == 48
            out = bytearray(2048)
            for key in hit.keys:
                assert kv.get(ns, key, out, lease=hit.lease) == 2048
            assert kv.get(ns, keys[3], out) is None
            assert kv.put(ns, keys[3], bytearray(chunk_bytes(3)))
        return
    d.register("tenant-a", TOKEN_A)
    d.put_chunks(ns, tokens[:48], TOKEN_A)
    h = ns.id.hex()
    assert (
        d.call("POST", "/v1/lookup", {"namespace": h, "tokens": tokens + list(range(16))}, TOKEN_A).status
        == 200
    )
    for key in keys[:3]:
        assert d.call("GET", f"/v1/chunks/{h}/{key.hex()}", token=TOKEN_A).status == 200
    assert d.call("GET", f"/v1/chunks/{h}/{keys[3].hex()}", token=TOKEN_A).status == 404
    d.put_chunks(ns, tokens, TOKEN_A)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    for d in running(DaemonProc(tmp_path_factory.mktemp("status"), tokens=TOKENS)):
        _traffic(d)
        d.wait_idle(ADMIN_TOKEN)
        yield d


def test_the_page_renders_the_numbers_of_v1_stats(daemon: DaemonProc, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{daemon.admin_port}/#token={ADMIN_TOKEN}"
    dom = Dom(chromium(["--virtual-time-budget=5000", "--dump-dom"], url))
    stats = daemon.call("GET", "/v1/stats", token=ADMIN_TOKEN).json()
    assert dom.attrs_of["state"].get("data-state") == "ok", dom.by_id.get("state")
    tiers = stats["tiers"]
    assert isinstance(tiers, list) and [t["name"] for t in tiers] == ["cpu", "disk"]
    for t in tiers:
        for field in ("used_bytes", "capacity_bytes", "entries", "hits", "evictions"):
            value, _ = dom.cells[(t["name"], field)]
            assert value == str(t[field]), (t["name"], field, value, t[field])
        assert dom.cells[(t["name"], "misses")][0] == str(sum(t["misses"].values()))
        assert dom.cells[(t["name"], "entries")][1] == f"{t['entries']:,}"
        assert float(dom.cells[(t["name"], "occupancy")][0] or -1) == pytest.approx(
            t["used_bytes"] / t["capacity_bytes"]
        )
        for reason, n in t["misses"].items():
            assert dom.cells[(t["name"], f"miss-{reason}")][0] == str(n)
    cpu = tiers[0]
    assert cpu["entries"] == 4 and cpu["used_bytes"] > 0 and cpu["hits"] >= 3  # real, non-zero numbers
    assert sum(cpu["misses"].values()) >= 1
    rate = stats["hit_rate"]
    assert isinstance(rate, dict) and rate["lookup_chunks"] == pytest.approx(3 / 5)
    assert float(dom.by_id["hit-rate-lookup"][0] or 0) == pytest.approx(rate["lookup_chunks"])
    assert dom.by_id["hit-rate-lookup"][1] == "60.0%"
    top_reads = cpu["hits"] + sum(cpu["misses"].values())
    assert rate["top_tier_reads"] == pytest.approx(cpu["hits"] / top_reads) and 0 < rate["top_tier_reads"] < 1
    assert float(dom.by_id["hit-rate-top"][0] or 0) == pytest.approx(rate["top_tier_reads"])
    assert dom.by_id["top-counts"][1] == f"{cpu['hits']} of {top_reads}"
    assert dom.by_id["hit-rate-gets"][0] == ("" if rate["gets"] is None else str(rate["gets"]))
    assert dom.by_id["namespaces"][0] == str(stats["namespaces"]) == "1"
    # throughput: the window starts at the daemon's first sample (all zeros), so it holds every put
    assert dom.by_id["window-puts"][0] == str(cpu["puts"]) and cpu["puts"] >= 4
    assert dom.by_id["window-put-bytes"][0] == str(cpu["put_bytes"])
    assert dom.by_id["window-gets"][0] == str(stats["gets"])
    assert 'points="' in chromium(["--virtual-time-budget=5000", "--dump-dom"], url)  # the chart was drawn
    shot = tmp_path / "status.png"
    chromium(["--virtual-time-budget=5000", "--window-size=1280,1100", f"--screenshot={shot}"], url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_without_a_token_the_page_asks_for_one(daemon: DaemonProc) -> None:
    dom = Dom(
        chromium(["--virtual-time-budget=3000", "--dump-dom"], f"http://127.0.0.1:{daemon.admin_port}/")
    )
    assert dom.attrs_of["state"].get("data-state") == "error"
    assert "hidden" not in dom.attrs_of["auth"]  # the token form is shown
    assert "bearer token" in dom.by_id["state"][1]
