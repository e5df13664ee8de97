"""Builds a CUDA kernel source as a CPU shared library (its ``*_EMULATE`` define) for the tests.

Each ``.cu`` file compiles as plain C++ with its emulation define, every kernel launch becoming
one CPU loop; tests load the library with ctypes to check the kernels' arithmetic and their
orchestration where no GPU is present. Skips the test where no C++ compiler is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def build_emulated(
    source: Path, define: str, tmp_path_factory: pytest.TempPathFactory, *, strict: bool = False
) -> Path:
    """``source`` compiled with ``-D{define}`` into a fresh shared library (``strict``: -Wall -Werror)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to emulate the CUDA kernels")
    out = tmp_path_factory.mktemp(define.lower()) / f"{source.stem}_emulated.so"
    warnings = ["-Wall", "-Werror"] if strict else []
    cmd = [compiler, "-std=c++17", "-O2", *warnings, f"-D{define}", "-x", "c++", "-shared", "-fPIC"]
    subprocess.run([*cmd, str(source), "-o", str(out)], check=True)
    return out
