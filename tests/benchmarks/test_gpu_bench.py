"""`kvstore bench gpu`: its flags, and a clean refusal where CUDA is not available."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvstore.benchmarks.gpu import GpuBenchConfig
from kvstore.errors import InvalidInput
from kvstore.tiers.gpu import cuda_available


@pytest.mark.skipif(cuda_available(), reason="CUDA is present: the benchmark would run")
def test_without_cuda_it_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "bench", "gpu", "--quick", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]
    assert "Traceback" not in done.stderr


def test_config_validation() -> None:
    with pytest.raises(InvalidInput):
        GpuBenchConfig(chunk_mib=32, ceiling_mib=64, tokens=512, keep=0.0, iters=1, warmup=0)
    with pytest.raises(InvalidInput):
        GpuBenchConfig(chunk_mib=0, ceiling_mib=64, tokens=512, keep=0.5, iters=1, warmup=0)


def test_help_names_the_figures() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "bench", "gpu", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--chunk-mib" in done.stdout and "--keep" in done.stdout


def test_measurement_modules_import_without_a_gpu() -> None:
    import kvstore.benchmarks.gpu_kernels as kernels
    import kvstore.benchmarks.gpu_measure as measure

    assert callable(measure.ceilings) and callable(kernels.cachegen)
