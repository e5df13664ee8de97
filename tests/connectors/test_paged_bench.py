"""The paged benchmark runs, reports the keys other benchmarks read, and prints JSON last."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kvstore.benchmarks.paged import PagedBenchConfig, main, measure_paged
from kvstore.models import torch_threads


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def test_measure_paged_returns_the_ratios() -> None:
    got = measure_paged(num_layers=2, num_tokens=100, iters=2, warmup=1, threads=1)
    for key in ("paged_vs_memcpy", "paged_gather_vs_memcpy", "paged_scatter_vs_memcpy"):
        assert isinstance(got[key], float) and got[key] > 0
    assert got["paged_vs_memcpy"] == min(got["paged_gather_vs_memcpy"], got["paged_scatter_vs_memcpy"])
    assert got["paged_bytes"] == 2 * 2 * 100 * 3 * 64 * 2
    assert got["paged_gather_mbps"] > 0 and got["memcpy_mbps"] > 0


def test_cli_prints_json_last(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--json", "--layers", "2", "--tokens", "40", "--layout", "flashinfer_hnd"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    values = json.loads(last)
    assert values["paged_tokens"] == 40 and values["paged_vs_memcpy"] > 0


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        PagedBenchConfig(layout="sglang_page_first")
    with pytest.raises(ValueError):
        PagedBenchConfig(num_tokens=0)
    with pytest.raises(TypeError):
        measure_paged(no_such_option=1)
    with pytest.raises(ValueError, match="cannot hold"):
        measure_paged(num_layers=1, num_tokens=64, num_blocks=2, iters=1)
