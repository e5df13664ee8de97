"""The ceilings of ``kvstore bench gpu`` and the GPU tier's transfers against them."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kvstore.benchmarks.common import (
    Case,
    Report,
    Timing,
    format_rate,
    format_ratio,
    measure_interleaved,
    say,
)
from kvstore.benchmarks.gpu import GpuBenchConfig
from kvstore.keys import ChunkKey, NamespaceId
from kvstore.tiers.base import ChunkMeta
from kvstore.tiers.gpu import GPUTier, GPUTierConfig

MIB = 1 << 20
KEY = ChunkKey(b"\x01" * 32)
META = ChunkMeta(NamespaceId(b"b" * 32), 0, b"")


@dataclass(frozen=True, slots=True)
class Ceilings:
    """Bytes per second of the plain copies every figure is compared with."""

    d2d: float
    pinned_h2d: float
    pinned_d2h: float


def versions() -> list[str]:
    """Device, driver, CUDA, torch and CuPy versions, one line each."""
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}",
    ]
    try:
        import cupy

        driver = cupy.cuda.runtime.driverGetVersion()
        lines.append(f"cupy {cupy.__version__}, CUDA driver API {driver // 1000}.{driver % 1000 // 10}")
    except Exception as exc:  # noqa: BLE001  # ImportError, driver errors: reported, not fatal
        lines.append(f"cupy: not usable ({type(exc).__name__}: {exc})")
    return lines


def synced(op: Callable[[], object]) -> Callable[[int], None]:
    """``op`` then a device synchronize: a wall-clock time of the whole device work."""

    def run(_: int) -> None:
        op()
        torch.cuda.synchronize()

    return run


def timed(cfg: GpuBenchConfig, cases: dict[str, Case]) -> dict[str, Timing]:
    torch.cuda.synchronize()
    return measure_interleaved(cases, iters=cfg.iters, warmup=cfg.warmup)


def versus(report: Report, label: str, key: str, rate: float, base: str, base_rate: float) -> float:
    """Record ``rate`` / ``base_rate`` under ``key`` with a line and a row; returns the ratio."""
    ratio = rate / base_rate
    report.record(key, round(ratio, 3))
    baseline = f"{base} {format_rate(base_rate)}"
    report.row(label, format_rate(rate), baseline, format_ratio(ratio), key)
    say(f"{label:<40} {format_rate(rate):>12}   vs {baseline:<32} {format_ratio(ratio)}")
    return ratio


def ceilings(cfg: GpuBenchConfig, report: Report) -> Ceilings:
    """d2d of ``ceiling_mib`` and pinned host<->device copies of one chunk, interleaved."""
    big = cfg.ceiling_mib * MIB
    chunk = cfg.chunk_mib * MIB
    a = torch.empty(big, dtype=torch.uint8, device="cuda").random_(0, 256)
    b = torch.empty_like(a)
    pinned = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    t = timed(
        cfg,
        {
            "d2d": Case(synced(lambda: b.copy_(a))),
            "pinned_h2d": Case(synced(lambda: dev.copy_(pinned, non_blocking=True))),
            "pinned_d2h": Case(synced(lambda: pinned.copy_(dev, non_blocking=True))),
        },
    )
    c = Ceilings(
        report.throughput("d2d", t["d2d"], big),
        report.throughput("pinned_h2d", t["pinned_h2d"], chunk),
        report.throughput("pinned_d2h", t["pinned_d2h"], chunk),
    )
    for name, rate in (("d2d", c.d2d), ("pinned_h2d", c.pinned_h2d), ("pinned_d2h", c.pinned_d2h)):
        report.row(f"ceiling: {name}", format_rate(rate), "-", "-", f"{name}_mbps")
        say(f"{'ceiling: ' + name:<40} {format_rate(rate):>12}")
    return c


def tier_transfers(cfg: GpuBenchConfig, c: Ceilings, report: Report) -> None:
    """GPUTier put / get of one chunk from and into pageable (staged) and pinned (direct) host memory."""
    n = cfg.chunk_mib * MIB
    tier = GPUTier(GPUTierConfig(capacity_bytes=2 * n + MIB))
    rng = np.random.default_rng(cfg.seed)
    pageable = rng.integers(0, 256, n, dtype=np.uint8)
    pageable_out = np.empty(n, dtype=np.uint8)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(torch.from_numpy(pageable))
    pinned_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def put(data: object) -> Case:
        return Case(lambda _: tier.put(KEY, data, META), teardown=lambda _: tier.delete(KEY))  # type: ignore[arg-type]

    t_put = timed(cfg, {"tier_put": put(pageable), "tier_put_pinned": put(pinned.numpy())})
    if not tier.put(KEY, pageable, META):
        raise AssertionError("the GPU tier refused a chunk it has room for")
    t_get = timed(
        cfg,
        {
            "tier_get": Case(lambda _: tier.get_into(KEY, pageable_out)),
            "tier_get_pinned": Case(lambda _: tier.get_into(KEY, pinned_out.numpy())),
        },
    )
    if not (np.array_equal(pageable_out, pageable) and torch.equal(pinned_out, pinned)):
        raise AssertionError("the GPU tier returned other bytes than it was given")
    mib = cfg.chunk_mib
    pairs = [
        (f"tier put {mib} MiB, pageable (staged)", "tier_h2d_vs_pinned", t_put["tier_put"], "pinned_h2d"),
        (f"tier get {mib} MiB, pageable (staged)", "tier_d2h_vs_pinned", t_get["tier_get"], "pinned_d2h"),
        (
            f"tier put {mib} MiB, pinned (direct)",
            "tier_h2d_direct_vs_pinned",
            t_put["tier_put_pinned"],
            "pinned_h2d",
        ),
        (
            f"tier get {mib} MiB, pinned (direct)",
            "tier_d2h_direct_vs_pinned",
            t_get["tier_get_pinned"],
            "pinned_d2h",
        ),
    ]
    for label, key, timing, base in pairs:
        versus(report, label, key, timing.rate(n), base, getattr(c, base))
