"""`kvstore bench codecs` end to end: a tiny run on the real model as a real process, its JSON checked.

Not a timed test: it checks that every codec and level was measured, that
the figures are what the codecs and the quality harness must give (lossless
codecs exactly as good as the stored KV, lossy ones smaller and measurably
worse, coarser levels smaller and worse), and that bad flags and a missing
GPU fail at once with a clear message.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore import cli
from kvstore.benchmarks.codecs import CodecsBenchConfig
from kvstore.benchmarks.codecs_variants import select, variants
from kvstore.codecs.base import codec_names
from kvstore.codecs.cachegen_params import DEFAULT_LEVEL, LEVEL_BINS
from kvstore.models import model_installed
from tests.models.real_model import SKIP_REASON

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
REQUIRED = (
    "cachegen_ratio_2048", "cachegen_ratio_256", "cachegen_ppl_delta", "cachegen_top1", "int8_ratio",
    "int8_top1", "int4_ratio", "int4_ppl_delta", "cachegen_cpu_decode_mbps",
)  # fmt: skip
PER_VARIANT = (
    "ratio", "ratio_256", "ratio_2048", "kl", "top1", "ppl_delta", "greedy_match",
    "cpu_encode_mbps", "cpu_decode_mbps", "encode_vs_zstd1", "decode_vs_zstd1",
)  # fmt: skip


def _bench(*flags: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kvstore.cli", "bench", "codecs", "--no-progress", *flags]
    return subprocess.run(
        argv, check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    """The JSON object of one ``--quick --json`` run (the model's KV of one 256-token prompt)."""
    if not model_installed():
        pytest.skip(SKIP_REASON)
    proc = _bench("--quick", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("codec / level") for line in lines[:-1])  # the table precedes the JSON
    assert any("not counted per chunk" in line for line in lines[:-1])  # the profile's bytes are named
    assert any("per-head Fisher-weighted transform" in line for line in lines[:-1])  # the default setup
    values: dict[str, Any] = json.loads(lines[-1])
    return values


def _number(values: dict[str, Any], key: str) -> float:
    value = values.get(key)
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
    assert math.isfinite(value), (key, value)
    return float(value)


def test_every_variant_reports_every_figure(quick: dict[str, Any]) -> None:
    for key in REQUIRED:
        _number(quick, key)
    for v in variants():
        for figure in PER_VARIANT:
            _number(quick, f"{v.key}_{figure}")
        assert _number(quick, f"{v.key}_cpu_encode_mbps") > 0
        assert _number(quick, f"{v.key}_cpu_decode_mbps") > 0
        assert 0.0 <= _number(quick, f"{v.key}_top1") <= 1.0
        assert _number(quick, f"{v.key}_kl") >= 0.0
    for key in ("zstd1_ratio_256", "zstd1_cpu_encode_mbps", "zstd1_cpu_decode_mbps"):
        assert _number(quick, key) > 0
    assert quick["context_tokens"] == 256 and quick["prompts"] == 1 and quick["threads"] == 1
    assert quick["recommended_sizes"] is False


def test_lossless_codecs_are_exactly_the_stored_kv(quick: dict[str, Any]) -> None:
    for key in ("raw", "lossless"):
        assert quick[f"{key}_kl"] == 0.0
        assert quick[f"{key}_top1"] == 1.0
        assert quick[f"{key}_ppl_delta"] == 0.0
        assert quick[f"{key}_greedy_match"] == quick["greedy_tokens"]
    assert 0.99 < quick["raw_ratio_256"] <= 1.0  # a container header on 5.9 MB
    assert 1.2 < quick["lossless_ratio_256"] < 2.0
    # the reference is the bf16 KV: the unrounded float32 KV differs from it, a little
    assert 0.0 < quick["fp32_kl"] < 1e-3


def test_lossy_codecs_are_smaller_and_measurably_worse(quick: dict[str, Any]) -> None:
    assert quick["int8_ratio"] > 1.85 and quick["int4_ratio"] > 3.4 and quick["int2_ratio"] > 6.5
    assert quick["fp8_ratio"] > 1.9
    assert 0.0 < quick["int8_kl"] < quick["int4_kl"] < quick["int2_kl"]
    assert quick["int2_top1"] < 1.0 and quick["int2_ppl_delta"] > 0.5  # 2 bits ruin this small model
    assert quick["int8_top1"] > 0.8
    # zstd-1 alone barely compresses bf16 KV; the codecs' speed is relative to it
    assert 1.0 < quick["zstd1_ratio_256"] < quick["lossless_ratio_256"]


def test_cachegen_levels_trade_size_for_quality(quick: dict[str, Any]) -> None:
    levels = sorted(LEVEL_BINS)
    ratios = [quick[f"cachegen_l{lv}_ratio_2048"] for lv in levels]
    assert ratios == sorted(ratios) and ratios[0] > 3.0
    assert quick[f"cachegen_l{levels[-1]}_kl"] > quick[f"cachegen_l{levels[0]}_kl"] > 0.0
    for lv in levels:  # the shared profile saves the per-chunk tables at 256 tokens
        assert quick[f"cachegen_l{lv}_ratio_256"] > quick[f"cachegen_l{lv}_ratio_256_own_tables"]
        assert quick[f"cachegen_l{lv}_profile_bytes"] > 0
    assert quick["cachegen_default_level"] == DEFAULT_LEVEL
    for figure in PER_VARIANT:  # the codec's own name holds its default level
        assert quick[f"cachegen_{figure}"] == quick[f"cachegen_l{DEFAULT_LEVEL}_{figure}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: --device cuda is valid here")
def test_device_cuda_without_cuda_fails_clearly() -> None:
    proc = _bench("--quick", "--json", "--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert "--device cuda: CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""  # no model was loaded, nothing measured


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--only", "int8,nope"], "unknown codec variant(s) ['nope']"),
        (["--context", "100"], "--context must be >= 256"),
        (["--context", "8190"], "exceed the model's 8192 positions"),
    ],
)
def test_bad_flags_fail_before_any_work(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "codecs", "--quick", "--no-progress", *flags]) == 2
    out, err = capsys.readouterr()
    assert message in err
    assert out == ""  # nothing was measured


def test_config_and_variants() -> None:
    with pytest.raises(ValueError, match="--prompts"):
        CodecsBenchConfig(prompts=0)
    with pytest.raises(ValueError, match="--continuation"):
        CodecsBenchConfig(continuation=1)
    assert CodecsBenchConfig().recommended and not CodecsBenchConfig(context=256).recommended
    all_variants = variants()
    assert {v.codec for v in all_variants} >= set(codec_names())  # every registered codec is measured
    assert len({v.key for v in all_variants}) == len(all_variants)
    assert [v.level for v in all_variants if v.alias == "cachegen"] == [DEFAULT_LEVEL]
    assert [v.key for v in select(all_variants, ["int4", "raw"])] == ["raw", "int4"]
