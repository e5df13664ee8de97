"""HFConnector on longer ShareGPT chats against real greedy decoding without kvstore (slow: ~15 min of CPU).

Twenty conversations, three user turns each, replies of up to 48 tokens,
messages of up to 128 tokens, 32-token chunks, float32 KV in an in-process
CPU store. The reference runs the same chats with no kvstore at all: every
turn's whole prompt prefilled with a fresh cache, then decoded one token at
a time; its own replies build its own history. Every reply of every turn
must be identical, and later turns must have reused prompt and decode KV.
Run with ``python -m pytest -m slow tests/connectors/test_hf_slow.py``.
"""

from __future__ import annotations

import pytest

from kvstore.builder import TiersConfig, build_store
from kvstore.connectors.hf import HFConnector
from kvstore.connectors.hf_chat import ChatTranscript, replay_chat, user_messages
from kvstore.models import LoadedModel
from tests.connectors.test_hf import conversations, float32_namespace, plain_greedy
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

CONVERSATIONS = 20
TURNS = 3
REPLY_TOKENS = 48
USER_TOKENS = 128
CHUNK = 32


def replies_without_kvstore(lm: LoadedModel, messages: list[str]) -> list[tuple[int, ...]]:
    chat = ChatTranscript(lm.tokenizer)
    replies = []
    for text in messages:
        reply = plain_greedy(lm, chat.add_user(text, USER_TOKENS), REPLY_TOKENS, chat.end_id)
        chat.add_reply(reply)
        replies.append(tuple(reply))
    return replies


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_longer_chats_reply_exactly_as_plain_greedy_decoding() -> None:
    lm = require_model()
    chats = [user_messages(c, TURNS) for c in conversations(CONVERSATIONS, seed=3, turns=TURNS)]
    with build_store(TiersConfig(cpu_bytes=1 << 30)) as store, \
            HFConnector(lm, store, float32_namespace(lm, "hf-slow", CHUNK)) as connector:
        ours = [replay_chat(connector, lm.tokenizer, messages, max_new_tokens=REPLY_TOKENS,
                            max_user_tokens=USER_TOKENS) for messages in chats]
        stats = connector.stats()
    differing = [
        (i, t)
        for i, (replay, messages) in enumerate(zip(ours, chats))
        for t, (turn, reference) in enumerate(zip(replay.turns, replies_without_kvstore(lm, messages)))
        if turn.reply != reference
    ]
    assert not differing, f"(chat, turn) whose reply differs from decoding without kvstore: {differing}"
    for replay in ours:
        for before, after in zip(replay.turns, replay.turns[1:]):
            fed = before.prompt_tokens + len(before.reply) - 1
            assert after.hit_tokens == fed // CHUNK * CHUNK
    assert stats.hit_rate > 0.5 and stats.lost_chunks == stats.backend_errors == 0
