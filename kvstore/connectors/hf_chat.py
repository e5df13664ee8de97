"""Multi-turn chats as token ids, and replaying one through an :class:`HFConnector`.

A chat's next prompt is its whole history plus the new user message. For that
prompt to reuse the KV of the previous turn, its token ids must *begin with*
the previous prompt and the reply exactly as generated. Re-rendering the
history as text and tokenizing it again does not promise that (a reply's
text may tokenize differently), so :class:`ChatTranscript` keeps the chat as
token ids and appends ChatML pieces (``<|im_start|>user\\n ... <|im_end|>\\n``)
tokenized on their own; ChatML's special tokens delimit every piece, so each
piece tokenizes the same inside the whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvstore.connectors.hf import HFConnector
from kvstore.errors import InvalidInput
from kvstore.models.prompts import Conversation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class ChatTranscript:
    """A ChatML chat kept as token ids; every prompt extends the one before it.

    Invariant: ``ids`` only grows; after :meth:`add_user` it ends with the
    assistant header, after :meth:`add_reply` with ``<|im_end|>\\n``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> None:
        """Start a chat (with a system message when given).

        Raises:
            InvalidInput: the tokenizer has no ChatML special tokens.
        """
        self._tok = tokenizer
        self.end_id = self._special(IM_END)
        self._special(IM_START)
        self.ids: list[int] = []
        if system is not None:
            self.ids += self._encode(f"{IM_START}system\n{system}{IM_END}\n")

    def add_user(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Append a user message (its first ``max_tokens`` tokens) and the assistant header; the prompt."""
        body = self._encode(text)[:max_tokens]
        self.ids += self._encode(f"{IM_START}user\n") + body + self._encode(f"{IM_END}\n{IM_START}assistant\n")
        return list(self.ids)

    def add_reply(self, tokens: Sequence[int]) -> None:
        """Append the reply exactly as generated, closed with ``<|im_end|>\\n`` (added if it did not end so)."""
        reply = list(tokens)
        if reply and reply[-1] == self.end_id:
            reply.pop()
        self.ids += reply + self._encode(f"{IM_END}\n")

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def _special(self, token: str) -> int:
        ids = self._encode(token)
        if len(ids) != 1:
            raise InvalidInput(f"the tokenizer has no {token!r} special token; ChatTranscript needs ChatML")
        return ids[0]


def user_messages(conversation: Conversation, max_turns: int | None = None) -> list[str]:
    """The user's messages of a conversation, in order (the assistant's are left out)."""
    return [text for role, text in conversation.turns if role == "user"][:max_turns]


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One turn of a replayed chat.

    Attributes:
        prompt_tokens: tokens in the turn's prompt (the whole history).
        hit_tokens: of those, tokens whose KV was loaded.
        reply: the generated tokens.
        ttft_s: time to the first token's logits.
        decode_s: time of the other decode steps.
    """

    prompt_tokens: int
    hit_tokens: int
    reply: tuple[int, ...]
    ttft_s: float
    decode_s: float


@dataclass(frozen=True, slots=True)
class ChatReplay:
    """A replayed chat: each turn, and the token ids of each turn's prompt."""

    turns: tuple[TurnRecord, ...]
    prompts: tuple[tuple[int, ...], ...]
    final_ids: tuple[int, ...]


def replay_chat(
    connector: HFConnector,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[str],
    *,
    max_new_tokens: int,
    max_user_tokens: int | None = None,
    max_context: int | None = None,
    between_turns: Callable[[], None] | None = None,
) -> ChatReplay:
    """Run a chat: each user message in turn, the model's own greedy reply, the history as the next prompt.

    Args:
        connector: generates each reply (and stores prompt and reply KV).
        tokenizer: a ChatML tokenizer.
        messages: the user's messages.
        max_new_tokens: cap on each reply.
        max_user_tokens: keep only this many tokens of each message.
        max_context: stop before a turn whose prompt plus reply could exceed this many tokens.
        between_turns: called after each turn (default: ``connector.flush``, so the
            next turn finds the previous one stored, as it would after a user's pause).
    """
    chat = ChatTranscript(tokenizer)
    turns: list[TurnRecord] = []
    prompts: list[tuple[int, ...]] = []
    for text in messages:
        before = list(chat.ids)
        prompt = chat.add_user(text, max_user_tokens)
        if max_context is not None and len(prompt) + max_new_tokens > max_context:
            chat.ids = before
            break
        result = connector.generate(prompt, max_new_tokens, eos_token_ids=[chat.end_id])
        chat.add_reply(result.tokens)
        prompts.append(tuple(prompt))
        turns.append(TurnRecord(len(prompt), result.hit_tokens, result.tokens, result.ttft_s, result.decode_s))
        (between_turns or connector.flush)()
    return ChatReplay(tuple(turns), tuple(prompts), tuple(chat.ids))
