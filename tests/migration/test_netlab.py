"""The network-emulation harness itself: shaped throughput, a rate changed mid-transfer, relay RTT."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kvstore.benchmarks.netlab import NetLab, rate_bps, unavailable_reason
from kvstore.benchmarks.relay import DelayRelay

PY = sys.executable


@pytest.fixture
def lab() -> Iterator[NetLab]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetLab(("a", "b"), rate="100mbit") as made:
        yield made


def _sink(lab: NetLab, port: int) -> subprocess.Popen[bytes]:
    proc = lab.popen("a", [PY, "-m", "kvstore.benchmarks.netlab", "sink", "--port", str(port)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and json.loads(proc.stdout.readline())["ready"]
    return proc


def _send(lab: NetLab, port: int, seconds: float) -> subprocess.Popen[bytes]:
    argv = [PY, "-m", "kvstore.benchmarks.netlab", "send", "--host", lab.node("a").ip, "--port", str(port),
            "--seconds", str(seconds)]
    return lab.popen("b", argv, stdout=subprocess.PIPE)


def _rate(samples: list[list[float]], t0: float, t1: float) -> float:
    """Bits per second sent between elapsed times t0 and t1 (nearest samples)."""
    a = min(samples, key=lambda s: abs(s[0] - t0))
    b = min(samples, key=lambda s: abs(s[0] - t1))
    return (b[1] - a[1]) * 8 / (b[0] - a[0])


def test_throughput_through_a_100mbit_link_is_close_to_it(lab: NetLab) -> None:
    _sink(lab, 9000)
    out, _ = _send(lab, 9000, 2.5).communicate(timeout=30)
    samples = json.loads(out)["samples"]
    measured = _rate(samples, 0.5, samples[-1][0])
    assert 0.70 * 100e6 <= measured <= 1.05 * 100e6, f"{measured / 1e6:.1f} Mbit/s"


def test_a_rate_changed_mid_transfer_takes_effect(lab: NetLab) -> None:
    _sink(lab, 9000)
    sender = _send(lab, 9000, 4.0)
    time.sleep(2.0)
    lab.set_rate("30mbit")
    out, _ = sender.communicate(timeout=30)
    samples = json.loads(out)["samples"]
    before = _rate(samples, 0.5, 1.8)
    after = _rate(samples, 2.6, samples[-1][0])
    assert 0.70 * 100e6 <= before <= 1.05 * 100e6, f"before {before / 1e6:.1f} Mbit/s"
    assert 0.70 * 30e6 <= after <= 1.05 * 30e6, f"after {after / 1e6:.1f} Mbit/s"


def test_relay_adds_the_round_trip_time_across_namespaces(lab: NetLab) -> None:
    echo = lab.popen("a", [PY, "-m", "kvstore.benchmarks.netlab", "echo", "--port", "9001"], stdout=subprocess.PIPE)
    assert echo.stdout is not None and json.loads(echo.stdout.readline())["ready"]
    a = lab.node("a")
    port = lab.start_relay("a", (a.ip, 9100), ("127.0.0.1", 9001), rtt_ms=20.0)
    out = lab.run("b", [PY, "-m", "kvstore.benchmarks.netlab", "ping", "--host", a.ip, "--port", str(port),
                        "--count", "20"])  # fmt: skip
    rtt = statistics.median(json.loads(out)["rtts"][2:])
    assert 0.019 <= rtt <= 0.030, f"median RTT {rtt * 1000:.1f} ms"
    direct = lab.run("b", [PY, "-m", "kvstore.benchmarks.netlab", "ping", "--host", a.ip, "--port", "9001"])
    assert statistics.median(json.loads(direct)["rtts"][2:]) < 0.005


def test_relay_keeps_throughput_on_loopback() -> None:
    """Without shaping, the relay moves far more than the 1 Gbit/s links it sits behind need."""

    async def run() -> tuple[float, float]:
        got = asyncio.Event()
        total = 0

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal total
            while data := await reader.read(1 << 20):
                total += len(data)
            got.set()
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        relay = DelayRelay(("127.0.0.1", 0), ("127.0.0.1", server.sockets[0].getsockname()[1]), rtt_s=0.02)
        await relay.start()
        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        block, nbytes = b"\0" * (1 << 20), 256 << 20
        t0 = time.monotonic()
        for _ in range(nbytes >> 20):
            writer.write(block)
            await writer.drain()
        writer.close()
        await got.wait()
        elapsed = time.monotonic() - t0
        await relay.close()
        server.close()
        return total, elapsed

    total, elapsed = asyncio.run(run())
    assert total == 256 << 20
    assert total * 8 / elapsed > 1.2e9, f"{total * 8 / elapsed / 1e9:.2f} Gbit/s"


def test_rates_are_checked() -> None:
    assert rate_bps("1gbit") == 1e9 and rate_bps("100mbit") == 1e8
    with pytest.raises(ValueError, match="rate"):
        rate_bps("fast")


def test_close_removes_every_namespace() -> None:
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason() or "")
    lab = NetLab(("x", "y", "z"), rate=None).create()
    names = [n.netns for n in lab.nodes.values()] + [lab.hub]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(n in listed for n in names)
    lab.close()
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
