"""The paged benchmark runs, reports the keys other benchmarks read, and prints JSON last."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
import torch

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


def test_paired_rounds_take_the_ratio_per_round() -> None:
    from kvstore.benchmarks.paged import measure_paired

    calls: list[str] = []

    def op(name: str) -> Callable[[], None]:
        return lambda: calls.append(name)

    paired = measure_paired({"a": op("a"), "b": op("b")}, op("m"), iters=3, warmup=1)
    # memcpy around every op; the ops swap places every other round
    first, second = ["m", "a", "m", "b", "m"], ["m", "b", "m", "a", "m"]
    assert calls == first + second + first + second  # one warm-up round, then three
    assert len(paired.ratios["a"]) == 3 and len(paired.timings["memcpy"].samples) == 6
    assert all(r > 0 for r in paired.ratios["a"]) and paired.ratio("b") > 0
    with pytest.raises(ValueError):
        measure_paired({}, op("m"), iters=1, warmup=0)


def test_measure_paged_runs_on_one_thread_by_default() -> None:
    with torch_threads(2):
        got = measure_paged(num_layers=1, num_tokens=32, iters=1, warmup=0)
        assert torch.get_num_threads() == 2
    assert got["paged_threads"] == 1
    assert 0 < got["paged_gather_vs_memcpy_p25"]
