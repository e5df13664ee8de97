"""Blended RAG prompts through HFConnector: passage KV stored once by content, reused at other positions.

Real Python-docs passages and real FAQ questions on the real model, KV kept
as float32 (the compute dtype, so what the store gives back is bit-for-bit
what was computed). A passage first seen in one prompt is stored under its
content key and, in a second prompt where it sits at another position and
after another passage, is read back instead of computed -- from an
in-process ``TieredStore`` and from a real ``kvstore serve`` daemon over TCP,
through a new connector (nothing kept in the process). Either way the
blended logits and the greedy reply are those of the in-process
``Blender`` over passage KV computed directly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvstore.blend.blender import Blender
from kvstore.blend.config import BlendConfig
from kvstore.blend.passages import PassageCache, compute_passage_kv
from kvstore.client import Client
from kvstore.connectors.hf import HFConnector
from kvstore.errors import InvalidInput
from kvstore.keys import content_key
from kvstore.models import LoadedModel
from kvstore.models.prompts import sample_faq, sample_passages
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore
from tests.connectors.test_hf import float32_namespace
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)
from tests.service.daemon_fixtures import DaemonProc, running

HEAD = "<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>user\n"
CONFIG = BlendConfig(ratio=0.15)
REPLY = 6
Rag = tuple[list[tuple[int, ...]], list[list[int]], list[int]]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return require_model()


@pytest.fixture(scope="module")
def rag(lm: LoadedModel) -> Rag:
    """Three 64-token passages, two questions (chat-formatted tails) and the chat head."""
    passages = [p.token_ids for p in sample_passages(lm.tokenizer, tokens=64, count=3, seed=5)]
    questions = [lm.encode(f"\nQuestion: {f.question}<|im_end|>\n<|im_start|>assistant\n")
                 for f in sample_faq(2, seed=5)]
    return passages, questions, lm.encode(HEAD)


_REFERENCES: dict[tuple[object, ...], tuple[torch.Tensor, list[int]]] = {}


def reference(lm: LoadedModel, passages: list[tuple[int, ...]], question: list[int], head: list[int]
              ) -> tuple[torch.Tensor, list[int]]:
    """The in-process blend of passage KV computed directly: first logits and the greedy reply (memoised)."""
    key = (tuple(passages), tuple(question), tuple(head))
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference(lm, passages, question, head)
    return _REFERENCES[key]


def _reference(lm: LoadedModel, passages: list[tuple[int, ...]], question: list[int], head: list[int]
               ) -> tuple[torch.Tensor, list[int]]:
    result = Blender(lm.model, CONFIG).blend([head, *(compute_passage_kv(lm.model, p) for p in passages), question])
    cache, logits, out = result.cache(lm.model.config), result.logits, []
    with torch.inference_mode():
        for _ in range(REPLY):
            out.append(int(logits.argmax()))
            logits = lm.model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache).logits[0, -1]
    return result.logits, out


def check_two_prompts(lm: LoadedModel, first: HFConnector, second: HFConnector,
                      rag: Rag) -> None:
    """Prompt 1 stores passages 0 and 1; prompt 2 (another connector) reuses passage 0 after passage 2."""
    (p0, p1, p2), (q1, q2), head = rag
    one = first.generate_blended([p0, p1], q1, REPLY, head=head, config=CONFIG, eos_token_ids=[])
    assert one.passage_hits == (False, False) and one.stored_tokens == 0
    two = second.blender(CONFIG).prefill([p2, p0], q2, head)
    assert two.passage_hits == (False, True) and two.stored_tokens == len(p0)
    ref_logits, _ = reference(lm, [p2, p0], q2, head)
    torch.testing.assert_close(two.logits, ref_logits, atol=1e-4, rtol=1e-4)
    reply = second.generate_blended([p2, p0], q2, REPLY, head=head, config=CONFIG, eos_token_ids=[])
    assert reply.passage_hits == (True, True) and reply.stored_tokens == len(p0) + len(p2)
    assert list(reply.tokens) == reference(lm, [p2, p0], q2, head)[1]
    assert list(one.tokens) == reference(lm, [p0, p1], q1, head)[1]
    assert 0.1 < reply.recomputed_fraction < 0.25 and reply.prompt_tokens == len(head) + 128 + len(q2)


def test_in_process_store_reuses_a_passage_at_another_position(lm: LoadedModel, rag: Rag) -> None:
    ns = float32_namespace(lm, "hf-blend", 16)
    with TieredStore([CPUTier(CPUTierConfig(capacity_bytes=64 << 20), "cpu")]) as store:
        with HFConnector(lm, store, ns) as a, HFConnector(lm, store, ns) as b:
            check_two_prompts(lm, a, b, rag)
        # stored through the chunk-cache index: kvstore.blend's PassageCache finds the same passages
        found = PassageCache(store, ns, lm.model).get(rag[0][0])
        assert found is not None and found.start_position == 0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = DaemonProc(tmp_path_factory.mktemp("hf-blend-daemon"), args=["--cpu-bytes", "64MiB", "--unix-path", ""])
    yield from running(proc)


def test_daemon_reuses_a_passage_stored_by_another_connector(lm: LoadedModel, daemon: DaemonProc, rag: Rag) -> None:
    ns = float32_namespace(lm, "hf-blend-daemon", 16)
    url = f"kvstore://127.0.0.1:{daemon.port}"
    with Client.connect(url) as c1, HFConnector(lm, c1, ns) as a, Client.connect(url) as c2, \
            HFConnector(lm, c2, ns) as b:
        check_two_prompts(lm, a, b, rag)
        # the daemon holds the passage under its content key, exactly the float32 KV computed on its own
        p0 = rag[0][0]
        want = compute_passage_kv(lm.model, p0).kv
        out = torch.empty_like(want)
        assert c2.get(b.ns, content_key(b.ns, p0), out) == want.numel() * 4
        torch.testing.assert_close(out, want)


def test_bad_blended_requests(lm: LoadedModel, rag: Rag) -> None:
    (p0, _, _), (q1, _), _ = rag
    with TieredStore([CPUTier(CPUTierConfig(capacity_bytes=16 << 20), "cpu")]) as store, \
            HFConnector(lm, store, float32_namespace(lm, "hf-blend-bad", 16)) as conn:
        with pytest.raises(InvalidInput, match="max_new_tokens"):
            conn.generate_blended([p0], q1, 0)
        with pytest.raises(InvalidInput, match="at least one token"):
            conn.generate_blended([[]], q1, 1)
        with pytest.raises(InvalidInput, match="min_passage_tokens"):
            conn.generate_blended([p0[:8]], q1, 1)
        with pytest.raises(InvalidInput, match="vocabulary"):
            conn.generate_blended([p0], [10**7], 1)
        with pytest.raises(InvalidInput, match="ratio"):
            conn.generate_blended([p0], q1, 1, config=BlendConfig(ratio=2.0))
        assert conn.stats().requests == 0
