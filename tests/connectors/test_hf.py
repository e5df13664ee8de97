"""HFConnector on real ShareGPT chats: greedy replies identical with and without kvstore.

Twenty real multi-turn conversations (the users' messages from ShareGPT, the
model's own greedy replies) run through the connector over an in-process CPU
store holding float32 KV (the model's compute dtype, no codec): each turn's
prompt is the whole history, so it reuses the previous turn's prompt *and*
reply KV. The reference is the same model without kvstore: one fresh
prefill over the whole final conversation, whose argmax at each reply
position is what greedy decoding without kvstore picks there (while the
tokens agree, they are exactly the inputs it would be fed; see
kvstore/quality.py). Replies are capped at 8 tokens and messages at 24 (each decode step of this
model costs ~0.1 s of CPU here), and the chunks are 16 tokens, so prompt KV
is reused in nearly every chat and decode KV in many; test_hf_slow.py runs
longer replies against real token-by-token decoding without kvstore.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import pytest
import torch

from kvstore.builder import TiersConfig, build_store
from kvstore.connectors.hf import HFConnector
from kvstore.connectors.hf_chat import ChatReplay, replay_chat, user_messages
from kvstore.keys import Namespace
from kvstore.models import LoadedModel
from kvstore.models.prompts import Conversation, load_sharegpt, sample_conversations, sharegpt_path
from kvstore.models.smollm2 import ModelNotInstalled
from kvstore.tiers.store import TieredStore
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

CONVERSATIONS = 20
TURNS = 2
REPLY_TOKENS = 8
USER_TOKENS = 24
CHUNK = 16


@functools.cache
def _sharegpt() -> list[Conversation]:
    return load_sharegpt()


def conversations(count: int, seed: int, turns: int) -> list[Conversation]:
    """``count`` ShareGPT chats with at least ``turns`` user messages (skips when the data is missing)."""
    try:
        sharegpt_path()
    except ModelNotInstalled as exc:
        pytest.skip(str(exc))
    return sample_conversations(count, seed=seed, min_turns=2 * turns, conversations=_sharegpt())


def reference_mismatches(lm: LoadedModel, replay: ChatReplay) -> list[tuple[int, int]]:
    """(turn, reply position) of every reply token that fresh-prefill greedy would not pick."""
    ids = torch.tensor([replay.final_ids])
    with torch.inference_mode():
        picks = lm.model(input_ids=ids).logits[0].argmax(-1).tolist()
    bad = []
    for t, (prompt, turn) in enumerate(zip(replay.prompts, replay.turns)):
        for j, token in enumerate(turn.reply):
            if picks[len(prompt) - 1 + j] != token:
                bad.append((t, j))
    return bad


def plain_greedy(lm: LoadedModel, ids: Sequence[int], max_new_tokens: int, end_id: int) -> list[int]:
    """Greedy decoding without kvstore: a fresh cache, the whole prompt prefilled, then one token at a time."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    x = torch.tensor([list(ids)])
    out: list[int] = []
    with torch.inference_mode():
        while True:
            logits = lm.model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == end_id or len(out) == max_new_tokens:
                return out
            x = torch.tensor([[out[-1]]])


def float32_namespace(lm: LoadedModel, tenant: str = "hf-test", chunk: int = CHUNK) -> Namespace:
    return Namespace(tenant, lm.spec_for("float32"), chunk_tokens=chunk)


def idle(store: TieredStore) -> None:
    """Every lease given back and no pin left in any memory tier."""
    assert store.stats().leases.active == 0
    assert store.top.pinned_count() == 0


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return require_model()


@pytest.fixture
def store() -> Iterator[TieredStore]:
    with build_store(TiersConfig(cpu_bytes=256 << 20)) as s:
        yield s


def run_chats(connector: HFConnector, lm: LoadedModel, chats: Sequence[Conversation], turns: int,
              reply_tokens: int, user_tokens: int) -> list[ChatReplay]:
    return [
        replay_chat(connector, lm.tokenizer, user_messages(c, turns), max_new_tokens=reply_tokens,
                    max_user_tokens=user_tokens)
        for c in chats
    ]


@pytest.mark.timeout(900)  # ~60 s of CPU; more wall time on a shared machine
def test_greedy_replies_match_fresh_prefill_on_twenty_sharegpt_chats(lm: LoadedModel, store: TieredStore) -> None:
    chats = conversations(CONVERSATIONS, seed=11, turns=TURNS)
    with HFConnector(lm, store, float32_namespace(lm)) as connector:
        replays = run_chats(connector, lm, chats, TURNS, REPLY_TOKENS, USER_TOKENS)
        stats = connector.stats()

    assert all(len(r.turns) == TURNS for r in replays)
    mismatches = {i: bad for i, r in enumerate(replays) if (bad := reference_mismatches(lm, r))}
    assert not mismatches, f"replies differ from greedy without kvstore at (chat: [(turn, position)]) {mismatches}"
    for r in replays:
        first, second = r.turns
        assert first.hit_tokens == 0
        # the second prompt reuses every full chunk of the first prompt + reply that was stored
        fed = first.prompt_tokens + len(first.reply) - 1
        assert second.hit_tokens == fed // CHUNK * CHUNK
    assert sum(r.turns[1].hit_tokens > 0 for r in replays) >= CONVERSATIONS - 2
    decode_hits = sum(r.turns[1].hit_tokens > r.turns[0].prompt_tokens // CHUNK * CHUNK for r in replays)
    assert decode_hits >= 3, "too few chats reused KV computed while decoding"
    assert stats.lost_chunks == stats.backend_errors == 0
    assert stats.writer.stored_chunks > 0 and stats.writer.dropped_jobs == stats.writer.failed_jobs == 0
    assert stats.hit_tokens == sum(t.hit_tokens for r in replays for t in r.turns)
    idle(store)
