"""The measurements of `kvstore bench blend`: the RAG workload, quality per ratio, TTFT."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from kvstore.benchmarks.blend import BlendBenchConfig, ratio_suffix
from kvstore.benchmarks.common import Report, say
from kvstore.blend.blender import Blender
from kvstore.blend.config import BlendConfig
from kvstore.blend.passages import PassageCache
from kvstore.blend.segments import Segment
from kvstore.keys import Namespace
from kvstore.models.prompts import faq_entries, sample_passages
from kvstore.models.smollm2 import LoadedModel
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore

HEAD = "<|im_start|>system\nAnswer the question from the documents below.<|im_end|>\n<|im_start|>user\n"
ASK = ("\nUsing only the documents above, answer the question below from the Python FAQ. If the documents do not "
       "cover it, answer briefly and precisely from what you know about Python, and quote the relevant names. Be concise.\n"
       "Question: {question}<|im_end|>\n<|im_start|>assistant\n")
"""The uncached tail: an instruction and a real FAQ question, ~64 tokens (median over the FAQ)."""


@dataclass(frozen=True, slots=True)
class RagPrompt:
    """Chat head, the chosen passages (pool indices, in prompt order), the question tail, the answer ids."""

    head: list[int]
    order: list[int]
    tail: list[int]
    answer: list[int]


@dataclass(slots=True)
class Tally:
    """Quality and timing of one ratio over all prompts."""

    kl_sum: float = 0.0
    agree: int = 0
    tokens: int = 0
    recomputed: list[float] = field(default_factory=list)
    per_prompt_top1: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)


def build_prompts(lm: LoadedModel, cfg: BlendBenchConfig) -> tuple[list[tuple[int, ...]], list[RagPrompt]]:
    """The passage pool and the prompts: seeded subsets in seeded orders, FAQ questions with long answers."""
    rng = random.Random(cfg.seed)
    pool = [p.token_ids for p in sample_passages(lm.tokenizer, tokens=cfg.passage_tokens, count=cfg.pool,
                                                 seed=cfg.seed)]
    faqs = [f for f in faq_entries() if len(lm.encode(f.answer)) >= cfg.answer_tokens]
    rng.shuffle(faqs)
    prompts = []
    for i in range(cfg.prompts):
        faq = faqs[i % len(faqs)]
        tail = lm.encode(ASK.format(question=faq.question))
        prompts.append(RagPrompt(lm.encode(HEAD), rng.sample(range(cfg.pool), cfg.passages), tail,
                                 lm.encode(faq.answer)[: cfg.answer_tokens]))
    return pool, prompts


def measure(lm: LoadedModel, cfg: BlendBenchConfig, report: Report) -> None:
    """Fill ``report`` with every figure the module docstring of kvstore.benchmarks.blend lists."""
    pool, prompts = build_prompts(lm, cfg)
    ns = Namespace("kvstore-bench-blend", lm.spec)
    nbytes = lm.spec.chunk_nbytes(cfg.passage_tokens) * cfg.pool
    with TieredStore([CPUTier(CPUTierConfig(capacity_bytes=nbytes + (64 << 20)), "cpu")]) as store:
        cache = PassageCache(store, ns, lm.model)
        say(f"computing {cfg.pool} passages of {cfg.passage_tokens} tokens on their own")
        for tokens in pool:
            cache.compute(tokens)
        blenders = {r: Blender(lm.model, BlendConfig(ratio=r), spec=ns.spec) for r in cfg.ratios}
        tallies = {r: Tally() for r in cfg.ratios}
        full_ttft: list[float] = []
        for n, prompt in enumerate(prompts):
            say(f"prompt {n + 1}/{len(prompts)}")
            _one_prompt(lm, cfg, cache, blenders, pool, prompt, tallies, full_ttft)
    _report(cfg, prompts, tallies, full_ttft, report)


def _one_prompt(
    lm: LoadedModel, cfg: BlendBenchConfig, cache: PassageCache, blenders: dict[float, Blender],
    pool: list[tuple[int, ...]], prompt: RagPrompt, tallies: dict[float, Tally], full_ttft: list[float],
) -> None:
    ids = prompt.head + [t for i in prompt.order for t in pool[i]] + prompt.tail
    model = lm.model
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids + prompt.answer[:-1]])).logits[0, len(ids) - 1 :]
    ref_lp = torch.log_softmax(ref, -1)
    for rnd in range(cfg.warmup + cfg.iters):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), logits_to_keep=1)
        if rnd >= cfg.warmup:
            full_ttft.append(time.perf_counter() - t0)
        for r, blender in blenders.items():
            t0 = time.perf_counter()
            found = cache.get_many([pool[i] for i in prompt.order])
            segs: list[Segment] = [prompt.head, *(p for p in found if p is not None), prompt.tail]
            result = blender.blend(segs)
            elapsed = time.perf_counter() - t0
            if len(segs) != len(prompt.order) + 2:
                raise RuntimeError("a passage vanished from the store during the benchmark")
            tally = tallies[r]
            if rnd >= cfg.warmup:
                tally.ttft.append(elapsed)
            if rnd == cfg.warmup:  # quality once per prompt
                with torch.inference_mode():
                    rest = model(input_ids=torch.tensor([prompt.answer[:-1]]), past_key_values=result.cache(model.config))
                    lp = torch.log_softmax(torch.cat([result.logits[None], rest.logits[0]]), -1)
                tally.kl_sum += float((ref_lp.exp() * (ref_lp - lp)).sum())
                agree = int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
                tally.agree += agree
                tally.tokens += int(lp.shape[0])
                tally.per_prompt_top1.append(agree / int(lp.shape[0]))
                tally.recomputed.append(result.recomputed_reused_fraction)


def _report(cfg: BlendBenchConfig, prompts: list[RagPrompt], tallies: dict[float, Tally], full_ttft: list[float],
            report: Report) -> None:
    full = statistics.median(full_ttft)
    prompt_tokens = statistics.median(len(p.head) + len(p.tail) + cfg.passages * cfg.passage_tokens for p in prompts)
    for key, value in (("model", "SmolLM2-135M-Instruct"), ("prompts", cfg.prompts), ("passages", cfg.passages),
                       ("passage_tokens", cfg.passage_tokens), ("prompt_tokens", int(prompt_tokens)),
                       ("question_tokens", int(statistics.median(len(p.tail) for p in prompts))),
                       ("answer_tokens", cfg.answer_tokens), ("threads", cfg.threads), ("iters", cfg.iters),
                       ("ttft_full_ms", round(full * 1e3, 1))):
        report.record(key, value)
    floor = tallies[0.0].kl_sum / max(tallies[0.0].tokens, 1)
    kls, tops = [], []
    for r in sorted(tallies):
        t, sfx = tallies[r], ratio_suffix(r)
        kl, top1 = t.kl_sum / t.tokens, t.agree / t.tokens
        ttft = statistics.median(t.ttft)
        kls.append(kl)
        tops.append(top1)
        figures: tuple[tuple[str, float | None], ...] = ((f"kl_{sfx}", round(kl, 5)), (f"top1_{sfx}", round(top1, 4)),
                           (f"kl_ratio_{sfx}", round(kl / floor, 4) if floor > 0 else None),
                           (f"ttft_{sfx}_ms", round(ttft * 1e3, 1)), (f"ttft_speedup_{sfx}", round(full / ttft, 3)),
                           (f"recomputed_{sfx}", round(statistics.mean(t.recomputed), 4)),
                           (f"top1_min_{sfx}", round(min(t.per_prompt_top1), 4)),
                           (f"top1_max_{sfx}", round(max(t.per_prompt_top1), 4)))
        for key, figure in figures:
            report.record(key, figure)
        ratio = f"{kl / floor:.3f}" if floor > 0 else "-"
        spread = f"{min(t.per_prompt_top1):.1%}-{max(t.per_prompt_top1):.1%}"
        report.row(f"r={r:g}: KL {kl:.4f} (x{ratio} of r=0), top-1 {top1:.1%} (per prompt {spread})",
                   f"TTFT {ttft * 1e3:.0f} ms", f"full prefill {full * 1e3:.0f} ms", f"{full / ttft:.2f}x",
                   f"ttft_speedup_{sfx}")
    report.record("monotonic", all(a >= b for a, b in pairwise(kls)) and all(a <= b for a, b in pairwise(tops)))
    report.note(f"{cfg.prompts} prompts of {cfg.passages} x {cfg.passage_tokens}-token Python-docs passages "
                f"+ a FAQ question (median {int(prompt_tokens)} tokens); quality over the last prompt token and "
                f"{cfg.answer_tokens - 1} teacher-forced FAQ-answer tokens; TTFT includes the store fetch")
