"""Prefill/decode hand-off end to end: the real SmolLM2 model and two real daemon processes.

The prefill side (its connector on daemon A) prefills a real prompt chunk by
chunk and pushes each chunk's KV to daemon B while it computes the next; the
decode side (a connector on daemon B) starts its request once the chunks are
announced, before the push completes, and its lookup waits for them: it
loads every full chunk, computes only the tail, and replies exactly as a
single-node run with the same chunked prefill (raw float32 KV).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.client import Client
from kvstore.connectors.hf import HFConnector, HFConnectorConfig
from kvstore.connectors.hf_handoff import HandoffResult, PrefillPusher
from kvstore.keys import prefix_keys
from kvstore.models import LoadedModel
from tests.connectors.test_hf import float32_namespace
from tests.connectors.test_hf_paths import prompt_ids
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)
from tests.service.daemon_fixtures import HAVE_DATAPLANE, DaemonProc

pytestmark = pytest.mark.skipif(not HAVE_DATAPLANE, reason="the data plane is not built")

CHUNK = 32
FULL_CHUNKS = 8
PROMPT = FULL_CHUNKS * CHUNK + 13  # a tail: the decode side computes it on top of the loaded chunks
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return require_model()


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    root = tmp_path_factory.mktemp("handoff-model")
    args = ["--cpu-bytes", "256MiB", "--unix-path", "", "--no-disk"]
    a = DaemonProc(root / "a", args=args, name="prefill").start()
    b = DaemonProc(root / "b", args=args, name="decode").start()
    yield a, b
    a.stop()
    b.stop()


def single_node(lm: LoadedModel, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy reply after the same chunked prefill in one process, and the prompt's last logits."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)

    def forward(part: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            out = lm.model(input_ids=torch.tensor([part]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    for start in range(0, len(ids), CHUNK):
        logits = forward(ids[start : start + CHUNK])
    first, reply = logits, []
    for _ in range(NEW_TOKENS):
        reply.append(int(torch.argmax(logits)))
        logits = forward(reply[-1:])
    return reply, first


def inflight(client: Client) -> dict[str, int]:
    found = client.stats().inflight
    assert found is not None
    return dict(found)


def test_prefill_on_a_decode_on_b_waits_for_the_push_and_replies_as_one_node(
    lm: LoadedModel, daemons: tuple[DaemonProc, DaemonProc], tmp_path: Path
) -> None:
    a, b = daemons
    ids = prompt_ids(lm, seed=3, tokens=PROMPT)
    expected, expected_logits = single_node(lm, ids)
    ns = float32_namespace(lm, "handoff", CHUNK)
    with Client.connect(f"kvstore://127.0.0.1:{a.port}") as kv_a, \
            Client.connect(f"kvstore://127.0.0.1:{b.port}") as kv_b:  # fmt: skip
        before = inflight(kv_b)
        prefill = HFConnector(lm, kv_a, ns)
        decode = HFConnector(lm, kv_b, ns, HFConnectorConfig(lookup_wait_s=60, store_decode=False))
        pushed: list[HandoffResult] = []
        sender = threading.Thread(target=lambda: pushed.append(PrefillPusher(prefill, kv_b).prefill(ids)))
        sender.start()
        deadline = time.monotonic() + 30
        while (now := inflight(kv_b))["announced"] == before["announced"]:
            assert time.monotonic() < deadline and sender.is_alive(), "the prefill side never announced"
            time.sleep(0.005)
        arrived_at_start = now["arrived"] - before["arrived"]
        started = time.monotonic()
        reply = decode.generate(ids, NEW_TOKENS, eos_token_ids=[])
        sender.join(120)
        after = inflight(kv_b)
        prefill.flush()
        held_by_a = kv_a.lookup(ns, keys=prefix_keys(ns, ids), lease=False).hit_chunks
        prefill.close()
        decode.close()
    (result,) = pushed
    assert result.announced == FULL_CHUNKS and len(result.pushed) == FULL_CHUNKS and result.failed == ()
    assert arrived_at_start < FULL_CHUNKS, "the push had finished before the decode side started"
    assert reply.hit_tokens == FULL_CHUNKS * CHUNK, reply  # every chunk on its way was waited for
    assert after["waits"] > before["waits"] and after["wait_timeouts"] == before["wait_timeouts"]
    assert after["arrived"] - before["arrived"] == FULL_CHUNKS and after["pending"] == 0
    assert list(reply.tokens) == expected  # greedy output identical to one node's
    assert torch.equal(result.logits, expected_logits)  # the prefill side computed what one node does
    assert held_by_a == FULL_CHUNKS  # and kept the chunks on its own daemon
    assert time.monotonic() - started < 60


def test_decode_side_without_a_push_computes_the_prompt(lm: LoadedModel, daemons: tuple[DaemonProc, DaemonProc]) -> None:
    """Nothing announced: a waiting lookup answers at once and the prompt is computed (never an error)."""
    _, b = daemons
    ids = prompt_ids(lm, seed=4, tokens=2 * CHUNK + 5)
    ns = float32_namespace(lm, "handoff-none", CHUNK)
    with Client.connect(f"kvstore://127.0.0.1:{b.port}") as kv_b, \
            HFConnector(lm, kv_b, ns, HFConnectorConfig(lookup_wait_s=30, store_decode=False)) as decode:  # fmt: skip
        start = time.monotonic()
        first = decode.prefill(ids)
        assert first.hit_tokens == 0 and time.monotonic() - start < 20
    assert np.isfinite(first.logits.numpy()).all()
