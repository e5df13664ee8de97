"""HFConnector through a real ``kvstore serve`` process over TCP, and docs/connectors.md's examples.

Real ShareGPT chats through the daemon reuse prompt and decode KV and reply
exactly as greedy decoding without kvstore; a chunk evicted between lookup
and get is computed again; the daemon holds no lease afterwards. Both
examples of docs/connectors.md run as written, in their own processes (the
second against this daemon).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvstore.buffers import BufferLike
from kvstore.client import Client
from kvstore.connectors.hf import HFConnector
from kvstore.connectors.hf_backend import ClientBackend
from kvstore.connectors.hf_chat import replay_chat, user_messages
from kvstore.keys import ChunkKey, Namespace
from kvstore.models import LoadedModel
from tests.connectors.test_hf import conversations, float32_namespace, reference_mismatches
from tests.connectors.test_hf_paths import fresh_logits, prompt_ids
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)
from tests.service.daemon_fixtures import DaemonProc, running

REPO = Path(__file__).resolve().parents[2]
CHUNK = 16


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return require_model()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = DaemonProc(tmp_path_factory.mktemp("hf-daemon"), args=["--cpu-bytes", "256MiB", "--unix-path", ""])
    yield from running(proc)


@pytest.fixture
def client(daemon: DaemonProc) -> Iterator[Client]:
    with Client.connect(f"kvstore://127.0.0.1:{daemon.port}") as kv:
        assert kv.info.shm_path is None  # TCP: every chunk crosses the socket
        yield kv


def no_leases(daemon: DaemonProc) -> None:
    reply = daemon.call("GET", "/v1/leases")
    assert reply.status == 200 and reply.json()["leases"] == []


def test_chats_through_the_daemon_reuse_kv_and_reply_as_without_it(
    lm: LoadedModel, daemon: DaemonProc, client: Client
) -> None:
    with HFConnector(lm, client, float32_namespace(lm, "hf-daemon", CHUNK)) as connector:
        replays = [
            replay_chat(connector, lm.tokenizer, user_messages(c, 2), max_new_tokens=8, max_user_tokens=24)
            for c in conversations(3, seed=21, turns=2)
        ]
        stats = connector.stats()
    assert [reference_mismatches(lm, r) for r in replays] == [[], [], []]
    for r in replays:
        first, second = r.turns
        assert second.hit_tokens == (first.prompt_tokens + len(first.reply) - 1) // CHUNK * CHUNK
    assert stats.hit_tokens >= 4 * CHUNK and stats.backend_errors == stats.lost_chunks == 0
    no_leases(daemon)


class EvictingClientBackend(ClientBackend):
    """Between lookup and get the lease is given up and chunk ``victim`` deleted, through the daemon."""

    def __init__(self, client: Client, victim: int) -> None:
        super().__init__(client)
        self.victim: int | None = victim

    def get_many(self, ns: Namespace, keys: Sequence[ChunkKey], outs: Sequence[BufferLike],
                 lease: int | None) -> list[int | None]:
        if self.victim is not None:  # once: the connector then reads again without the dead lease
            self.client.release(lease)
            assert self.client.delete(ns, keys[self.victim])
            self.victim = None
        return super().get_many(ns, keys, outs, lease)


def test_a_chunk_evicted_in_the_daemon_between_lookup_and_get_is_computed(
    lm: LoadedModel, daemon: DaemonProc, client: Client
) -> None:
    ns = float32_namespace(lm, "hf-daemon-evict", CHUNK)
    ids = prompt_ids(lm, seed=31, tokens=72)
    with HFConnector(lm, client, ns) as first:
        first.prefill(ids)
        first.flush()
    with HFConnector(lm, EvictingClientBackend(client, victim=1), ns) as connector:
        got = connector.prefill(ids)
        assert got.hit_tokens == CHUNK and connector.stats().lost_chunks == len(ids) // CHUNK - 1
    ref = fresh_logits(lm, ids)
    assert int(got.logits.argmax()) == int(ref.argmax()) and torch.allclose(got.logits, ref, atol=1e-3)
    no_leases(daemon)


def _examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "connectors.md").read_text(), re.DOTALL)
    assert len(blocks) == 2, "docs/connectors.md should have two python examples"
    return blocks


def _run(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=REPO, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_the_in_process_example_runs_as_written() -> None:
    (prompt1, hit1), (prompt2, hit2), (total, hit3) = (map(int, line.split()) for line in
                                                       _run(_examples()[0], {"HF_HUB_OFFLINE": "1"}))
    assert hit1 == 0 and prompt2 > prompt1 and 0 < hit2 < prompt2 and hit2 % 32 == 0
    assert total > prompt2 and hit3 % 32 == 0 and 0 < total - hit3 <= 32 + 2  # a partial chunk + <|im_end|>\n


def test_the_daemon_example_runs_as_written(daemon: DaemonProc) -> None:
    (line,) = _run(_examples()[1], {"HF_HUB_OFFLINE": "1", "KVSTORE_URL": f"kvstore://127.0.0.1:{daemon.port}"})
    first, second, tiers = line.split(" ", 2)
    assert (int(first), int(second)) == (0, 192)  # as the page says
    assert ast.literal_eval(tiers) == {"cpu"}
