"""The kernels' figures of ``kvstore bench gpu``: paged gather/scatter, blend, cachegen."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from kvstore.benchmarks.common import Case, Report, format_rate, say
from kvstore.benchmarks.gpu import GpuBenchConfig
from kvstore.benchmarks.gpu_measure import Ceilings, synced, timed, versus

LAYERS, HEADS, DIM, BLOCK = 30, 3, 64, 16  # SmolLM2-135M's KV geometry, vLLM's default block size


def cupy_ready(report: Report) -> bool:
    """CuPy is importable and sees the device; a note says why not otherwise."""
    if importlib.util.find_spec("cupy") is None:
        report.note("kernel figures skipped: CuPy is not installed (pip install 'kvstore[gpu]')")
        return False
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001  # driver and runtime errors of any kind
        report.note(f"kernel figures skipped: CuPy cannot use the device ({exc})")
        return False
    return True


def paged(cfg: GpuBenchConfig, c: Ceilings, report: Report) -> None:
    """Gather and scatter of ``cfg.tokens`` tokens in shuffled blocks of a vLLM flash (NHD) cache."""
    from kvstore.connectors.paged import KernelMover, PagedKVCache, gather, scatter

    blocks = -(-cfg.tokens // BLOCK) * 2
    g = torch.Generator().manual_seed(cfg.seed)
    layers = [
        torch.randn(2, blocks, BLOCK, HEADS, DIM, generator=g).to(torch.bfloat16).cuda()
        for _ in range(LAYERS)
    ]
    cache = PagedKVCache.wrap(layers, "vllm_flash_nhd")
    table = torch.randperm(blocks, generator=g)[: -(-cfg.tokens // BLOCK)]
    slots = cache.block_table_slots(table.tolist(), 0, cfg.tokens).cuda()
    mover = KernelMover()
    out = torch.empty(cache.geometry.chunk_shape(cfg.tokens), dtype=torch.bfloat16, device="cuda")
    chunk = torch.randn(out.shape, generator=g).to(torch.bfloat16).cuda()
    t = timed(
        cfg,
        {
            "paged_gather": Case(synced(lambda: gather(cache, slots, out, mover=mover))),
            "paged_scatter": Case(synced(lambda: scatter(cache, slots, chunk, mover=mover))),
        },
    )
    n = out.numel() * out.element_size()
    gather_rate = report.throughput("paged_gather", t["paged_gather"], n)
    scatter_rate = report.throughput("paged_scatter", t["paged_scatter"], n)
    versus(report, f"paged gather {cfg.tokens} tokens", "paged_gather_vs_d2d", gather_rate, "d2d", c.d2d)
    versus(report, f"paged scatter {cfg.tokens} tokens", "paged_scatter_vs_d2d", scatter_rate, "d2d", c.d2d)
    versus(
        report, "paged, the slower of the two", "paged_vs_d2d", min(gather_rate, scatter_rate), "d2d", c.d2d
    )


def blend(cfg: GpuBenchConfig, c: Ceilings, report: Report) -> None:
    """RoPE shift of one chunk's K in place, and the gather of ``cfg.keep`` of its tokens (float32)."""
    from kvstore.blend.gpu import BlendKernels, CupyLauncher
    from kvstore.blend.rope import RopeSpec

    kernels = BlendKernels(CupyLauncher())
    g = torch.Generator().manual_seed(cfg.seed + 1)
    keys = torch.randn(LAYERS, cfg.tokens, HEADS, DIM, generator=g).cuda()
    delta = torch.randint(-4096, 4096, (cfg.tokens,), generator=g).cuda()
    rope = RopeSpec.standard(DIM, 1e5)
    src = torch.randn(LAYERS * HEADS * 2, cfg.tokens, DIM, generator=g).cuda()  # every layer's K and V
    idx = torch.randperm(cfg.tokens, generator=g)[: max(1, round(cfg.keep * cfg.tokens))].sort().values.cuda()
    t = timed(
        cfg,
        {
            "rope_shift": Case(synced(lambda: kernels.shift_keys_(keys, delta, rope))),
            "token_gather": Case(synced(lambda: kernels.gather(src, idx))),
        },
    )
    rope_bytes = keys.numel() * 4
    gather_bytes = src.shape[0] * idx.numel() * DIM * 4
    rate = report.throughput("rope_shift", t["rope_shift"], rope_bytes)
    versus(report, f"RoPE shift, K of {cfg.tokens} tokens", "rope_vs_d2d", rate, "d2d", c.d2d)
    rate = report.throughput("token_gather", t["token_gather"], gather_bytes)
    versus(report, f"selective gather, {cfg.keep:.0%} of tokens", "gather_vs_d2d", rate, "d2d", c.d2d)


def kv_chunk(tokens: int, seed: int) -> torch.Tensor:
    """A bf16 chunk ``[layers, 2, tokens, heads, dim]`` with KV-like per-channel scales and offsets."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(LAYERS, 2, 1, HEADS, DIM, generator=g))
    offset = torch.randn(LAYERS, 2, 1, HEADS, DIM, generator=g)
    x = torch.randn(LAYERS, 2, tokens, HEADS, DIM, generator=g) * scale + offset
    return x.to(torch.bfloat16)


def cachegen(cfg: GpuBenchConfig, report: Report) -> None:
    """GpuCoder encode (device input -> container bytes) and decode (container -> device output)."""
    import kvstore.codecs  # noqa: F401  # registers the codecs
    from kvstore.codecs.base import ChunkLayout
    from kvstore.codecs.cachegen import CachegenCodec
    from kvstore.codecs.cachegen_gpu import CupyBackend, GpuCoder
    from kvstore.spec import KVSpec, ModelFingerprint

    backend = CupyBackend()
    layout = ChunkLayout(KVSpec(ModelFingerprint("smollm2-like"), LAYERS, HEADS, DIM, "bfloat16"), cfg.tokens)
    codec = CachegenCodec()
    coder = GpuCoder(codec, backend)
    host = kv_chunk(cfg.tokens, cfg.seed + 2).reshape(-1).view(torch.uint8).numpy()
    device_in = backend.upload(host)
    device_out = backend.empty(layout.nbytes, np.uint8)
    blob = coder.encode(device_in, layout)
    if blob != codec.encode(host, layout):
        raise AssertionError("cachegen on the GPU wrote other bytes than the CPU coder")
    t = timed(
        cfg,
        {
            "cachegen_encode": Case(synced(lambda: coder.encode(device_in, layout))),
            "cachegen_decode": Case(synced(lambda: coder.decode_into(blob, device_out))),
        },
    )
    n = layout.nbytes
    for name, label in (("encode", "GB/s of bf16 input"), ("decode", "GB/s of bf16 output")):
        rate = t[f"cachegen_{name}"].rate(n)
        report.record(f"cachegen_{name}_gbps", round(rate / 1e9, 3))
        report.row(
            f"cachegen {name}, {cfg.tokens} tokens", format_rate(rate), "-", "-", f"cachegen_{name}_gbps"
        )
        say(f"{'cachegen ' + name:<40} {format_rate(rate):>12}   ({label}; ratio {n / len(blob):.2f}x)")
    report.record("cachegen_ratio", round(n / len(blob), 3))
