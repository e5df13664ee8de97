"""`kvstore inspect FILE` prints a container, and says clearly when it is not one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import kvstore.codecs  # noqa: F401
from kvstore.codecs.base import ChunkLayout, make_codec
from kvstore.spec import KVSpec, ModelFingerprint


def test_inspect_command(tmp_path: Path) -> None:
    spec = KVSpec(ModelFingerprint("m"), 2, 2, 8, "float16")
    raw = np.random.default_rng(0).standard_normal(spec.chunk_shape(16)).astype(np.float16)
    blob = make_codec("lossless").encode(raw.view(np.uint8).reshape(-1), ChunkLayout(spec, 16))
    good = tmp_path / "chunk.kvc"
    good.write_bytes(blob)
    out = subprocess.run([sys.executable, "-m", "kvstore.cli", "inspect", str(good)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lossless" in out.stdout and "16 tokens" in out.stdout
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(blob[:-7])
    out = subprocess.run([sys.executable, "-m", "kvstore.cli", "inspect", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
