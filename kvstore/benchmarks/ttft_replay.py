"""A ShareGPT chat replay: how much prefill a multi-turn chat saves when its history's KV is kept.

Each sampled conversation is replayed turn by turn: the user's messages from
the dataset, the model's own greedy replies (capped), each turn's prompt the
whole history (:class:`~kvstore.connectors.hf_chat.ChatTranscript`), through
an :class:`HFConnector` over an in-process CPU store that keeps prompt and
reply KV. Right after each turn the same prompt is prefilled once more
without kvstore (a fresh cache): the baseline, timed under the same load.
Between turns the connector is flushed, as a user's pause would let it.

Reported: the hit rate (prompt tokens loaded / prompt tokens) and
``sharegpt_prefill_saved = 1 - sum(cached prefill) / sum(full prefill)``
over every turn, the first turns (which hit nothing) included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvstore.benchmarks.common import Report, say
from kvstore.benchmarks.ttft import ReplaySetup
from kvstore.benchmarks.ttft_prefill import full_prefill
from kvstore.builder import TiersConfig, build_store
from kvstore.connectors.hf import HFConnector
from kvstore.connectors.hf_chat import ChatTranscript, user_messages
from kvstore.keys import Namespace
from kvstore.models.prompts import sample_conversations
from kvstore.models.smollm2 import LoadedModel


@dataclass(slots=True)
class _Totals:
    turns: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    cached_s: float = 0.0
    full_s: float = 0.0
    reply_tokens: int = 0


def replay_sharegpt(lm: LoadedModel, ns: Namespace, setup: ReplaySetup, report: Report) -> None:
    """Replay the conversations; record hit rate and prefill saved."""
    chats = sample_conversations(setup.conversations, seed=setup.seed, min_turns=4)
    totals = _Totals()
    with build_store(TiersConfig(cpu_bytes=2 << 30)) as store, HFConnector(lm, store, ns) as connector:
        for k, conversation in enumerate(chats):
            _replay_one(lm, connector, user_messages(conversation, setup.max_turns), setup, totals)
            say(f"chat {k + 1}/{len(chats)}: {totals.turns} turns so far, hit rate "
                f"{totals.hit_tokens / max(totals.prompt_tokens, 1):.1%}, prefill "
                f"{totals.cached_s:.1f} s cached vs {totals.full_s:.1f} s full")
        stats = connector.stats()
    saved = 1.0 - totals.cached_s / totals.full_s
    hit_rate = totals.hit_tokens / totals.prompt_tokens
    report.record("sharegpt_conversations", len(chats))
    report.record("sharegpt_turns", totals.turns)
    report.record("sharegpt_prompt_tokens", totals.prompt_tokens)
    report.record("sharegpt_reply_tokens", totals.reply_tokens)
    report.record("sharegpt_hit_rate", round(hit_rate, 4))
    report.record("sharegpt_prefill_cached_s", round(totals.cached_s, 3))
    report.record("sharegpt_prefill_full_s", round(totals.full_s, 3))
    report.record("sharegpt_prefill_saved", round(saved, 4))
    report.record("sharegpt_chunks_stored", stats.writer.stored_chunks)
    report.row(f"ShareGPT replay, {totals.turns} turns", f"{totals.cached_s:.2f} s prefill",
               f"no cache {totals.full_s:.2f} s", f"{saved:.1%} saved", "sharegpt_prefill_saved")
    report.row("ShareGPT replay hit rate", f"{hit_rate:.1%} of prompt tokens", "-", "-", "sharegpt_hit_rate")
    say(f"{'ShareGPT prefill saved':<40} {saved:10.1%}   hit rate {hit_rate:.1%} over {totals.turns} turns")


def _replay_one(lm: LoadedModel, connector: HFConnector, messages: list[str], setup: ReplaySetup,
                totals: _Totals) -> None:
    chat = ChatTranscript(lm.tokenizer)
    for text in messages:
        before = list(chat.ids)
        prompt = chat.add_user(text, setup.max_user_tokens)
        if len(prompt) + setup.reply_tokens > setup.max_context:
            chat.ids = before
            return
        result = connector.generate(prompt, setup.reply_tokens, eos_token_ids=[chat.end_id])
        chat.add_reply(result.tokens)
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        full_prefill(lm, ids)
        totals.full_s += time.perf_counter() - t0
        totals.cached_s += result.ttft_s
        totals.turns += 1
        totals.prompt_tokens += len(prompt)
        totals.hit_tokens += result.hit_tokens
        totals.reply_tokens += len(result.tokens)
        connector.flush()  # the user's pause: the reply's KV is stored before the next turn
