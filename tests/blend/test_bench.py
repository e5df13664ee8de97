"""`kvstore bench blend` at a tiny size, in process: every figure present, r = 1 equal to full prefill, spreads sane."""

from __future__ import annotations

import pytest

from kvstore.benchmarks.blend import BlendBenchConfig, ratio_suffix
from kvstore.benchmarks.blend_run import measure
from kvstore.benchmarks.common import Report
from kvstore.errors import InvalidInput
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)


def test_tiny_run_reports_every_figure() -> None:
    lm = require_model()
    cfg = BlendBenchConfig(prompts=2, passages=2, pool=3, passage_tokens=48, answer_tokens=8, iters=1, warmup=0,
                           ratios=(0.0, 0.15, 1.0))
    report = Report()
    measure(lm, cfg, report)
    v = report.values
    assert v["prompts"] == 2 and v["passages"] == 2 and v["answer_tokens"] == 8
    for r in cfg.ratios:
        sfx = ratio_suffix(r)
        for key in ("kl", "top1", "kl_ratio", "ttft", "ttft_speedup", "recomputed", "top1_min", "top1_max"):
            name = f"{key}_{sfx}_ms" if key == "ttft" else f"{key}_{sfx}"
            assert isinstance(v[name], (int, float)), (name, v[name])
        assert v[f"top1_min_{sfx}"] <= v[f"top1_{sfx}"] <= v[f"top1_max_{sfx}"]  # type: ignore[operator]
    assert v["top1_r1"] == 1.0 and v["kl_r1"] < 1e-4 and v["recomputed_r1"] == 1.0
    assert v["kl_r015"] < v["kl_r0"] and v["recomputed_r0"] == 0.0
    assert abs(v["recomputed_r015"] - 0.15) < 0.02  # type: ignore[operator]


def test_bad_config_is_refused() -> None:
    with pytest.raises(InvalidInput, match="include 0"):
        BlendBenchConfig(prompts=1, passages=2, pool=3, passage_tokens=48, answer_tokens=8, iters=1, warmup=0,
                         ratios=(0.15, 1.0))
    with pytest.raises(InvalidInput, match="pool"):
        BlendBenchConfig(prompts=1, passages=4, pool=3, passage_tokens=48, answer_tokens=8, iters=1, warmup=0)
