"""Real prompts and reference computations shared by the blending tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.blend.passages import compute_passage_kv
from kvstore.blend.segments import PassageKV, Segment
from kvstore.models.prompts import sample_faq, sample_passages
from kvstore.models.smollm2 import LoadedModel


def rag_segments(lm: LoadedModel, tokens: int, count: int, seed: int = 7) -> tuple[list[Segment], list[int]]:
    """A chat-formatted RAG prompt over ``count`` real doc passages + a real FAQ question, and its answer's ids."""
    passages = sample_passages(lm.tokenizer, tokens=tokens, count=count, seed=seed)
    faq = sample_faq(1, seed=seed)[0]
    head = lm.encode("<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>user\n")
    tail = lm.encode(f"\nQuestion: {faq.question}<|im_end|>\n<|im_start|>assistant\n")
    segs: list[Segment] = [head]
    for p in passages:
        segs.append(compute_passage_kv(lm.model, p.token_ids))
    segs.append(tail)
    return segs, lm.encode(faq.answer)


def prompt_ids(segments: Sequence[Segment]) -> list[int]:
    out: list[int] = []
    for s in segments:
        out.extend(s.tokens if isinstance(s, PassageKV) else s)
    return out


def full_logits(lm: LoadedModel, ids: Sequence[int], answer: Sequence[int] = ()) -> torch.Tensor:
    """Logits of the last prompt token and of each teacher-forced answer token but the last, by full prefill."""
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([list(ids) + list(answer)])).logits[0]
    return out[len(ids) - 1 : len(ids) + max(len(answer), 1) - 1]


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over rows."""
    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())
