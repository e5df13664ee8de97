"""The blender on the real model: r=1 is full prefill, r=0 is pure reuse, uncached tokens are always computed."""

from __future__ import annotations

import time

import pytest
import torch

from kvstore.blend.blender import Blender
from kvstore.blend.config import BlendConfig
from kvstore.blend.passages import PassageCache, compute_passage_kv
from kvstore.blend.rope import rope_from_model, shift_keys
from kvstore.blend.segments import PassageKV
from kvstore.blend.select import keep_count
from kvstore.errors import InvalidInput, ShapeMismatch
from kvstore.keys import Namespace
from kvstore.models.kv import append_chunk
from kvstore.spec import KVSpec
from kvstore.tiers.cpu import CPUTier, CPUTierConfig
from kvstore.tiers.store import TieredStore
from tests.blend.helpers import full_logits, kl, prompt_ids, rag_segments
from tests.models.real_model import model_threads, require_model  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def rag() -> tuple[list[object], list[int]]:
    lm = require_model()
    return rag_segments(lm, tokens=96, count=3)  # type: ignore[return-value]


def test_full_ratio_reproduces_full_prefill(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    segs, answer = rag
    result = Blender(lm.model, BlendConfig(ratio=1.0)).blend(segs)  # type: ignore[arg-type]
    ids = prompt_ids(segs)  # type: ignore[arg-type]
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
    torch.testing.assert_close(result.logits, out.logits[0, -1], atol=2e-4, rtol=1e-4)
    ref = out.past_key_values.layers
    for i in (0, 15, 29):
        torch.testing.assert_close(result.keys[i], ref[i].keys[0], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(result.values[i], ref[i].values[0], atol=2e-4, rtol=1e-4)
    assert result.recomputed.tolist() == list(range(len(ids)))
    assert result.recomputed_reused_fraction == 1.0
    with torch.inference_mode():  # decoding from the blended cache continues the full prefill's text
        nxt = lm.model(input_ids=torch.tensor([answer[:8]]), past_key_values=result.cache(lm.model.config)).logits[0]
    torch.testing.assert_close(nxt, full_logits(lm, ids, answer[:9])[1:], atol=5e-4, rtol=1e-4)


def test_zero_ratio_is_pure_reuse(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    segs, _ = rag
    result = Blender(lm.model, BlendConfig(ratio=0.0)).blend(segs)  # type: ignore[arg-type]
    rope = rope_from_model(lm.model)
    head, *passages, tail = segs
    with torch.inference_mode():  # reference: compute the head, append each passage's moved KV, compute the tail
        cache = lm.model(input_ids=torch.tensor([head]), use_cache=True).past_key_values
        offset = len(head)  # type: ignore[arg-type]
        for p in passages:
            assert isinstance(p, PassageKV)
            moved = p.kv.clone()
            moved[:, 0] = shift_keys(p.kv[:, 0], offset - p.start_position, rope)
            append_chunk(cache, moved)
            offset += len(p)
        ref = lm.model(input_ids=torch.tensor([tail]), past_key_values=cache).logits[0, -1]
    torch.testing.assert_close(result.logits, ref, atol=2e-4, rtol=1e-4)
    uncached = (~result.reused).nonzero().reshape(-1).tolist()
    assert result.recomputed.tolist() == uncached
    assert result.recomputed_reused_fraction == 0.0


def test_uncached_tokens_always_recomputed(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    segs, _ = rag
    for cfg in (BlendConfig(ratio=0.15), BlendConfig(ratio=0.1, gradual=(0.5, 0.3), check_layer=2)):
        result = Blender(lm.model, cfg).blend(segs)  # type: ignore[arg-type]
        chosen = set(result.recomputed.tolist())
        assert set((~result.reused).nonzero().reshape(-1).tolist()) <= chosen
        n_reused = int(result.reused.sum())
        assert int(result.reused[result.recomputed].sum()) == keep_count(cfg.ratio, n_reused)
    # a prompt ending in a passage still recomputes its last token (its logits start the answer)
    ending = Blender(lm.model, BlendConfig(ratio=0.0)).blend(segs[:-1])  # type: ignore[arg-type]
    assert ending.recomputed[-1].item() == len(ending.ids) - 1


def test_selection_options_on_a_real_prompt(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    segs, _ = rag
    lengths = [len(p) for p in segs[1:-1]]  # type: ignore[arg-type]
    starts = [len(segs[0]) + sum(lengths[:n]) for n in range(len(lengths))]  # type: ignore[arg-type]
    sinks = Blender(lm.model, BlendConfig(ratio=0.1, sink_tokens=3)).blend(segs)  # type: ignore[arg-type]
    chosen = set(sinks.recomputed.tolist())
    assert all(s + j in chosen for s in starts for j in range(3))  # every passage's opening, always
    n_reused = int(sinks.reused.sum())
    assert int(sinks.reused[sinks.recomputed].sum()) == keep_count(0.1, n_reused)  # sinks come out of the budget
    per = Blender(lm.model, BlendConfig(ratio=0.2, per_passage=True, deviation="k")).blend(segs)  # type: ignore[arg-type]
    rec = per.recomputed
    for s, n in zip(starts, lengths):
        assert int(((rec >= s) & (rec < s + n)).sum()) == keep_count(0.2, n)
    # one filtering step after three full layers: each ranking below picks other tokens on this short prompt
    one = {"ratio": 0.2, "check_layer": 3, "gradual": ()}
    base = Blender(lm.model, BlendConfig(**one)).blend(segs)  # type: ignore[arg-type]
    others = [BlendConfig(**one, deviation=m) for m in ("v", "kv_head_norm")] + [  # type: ignore[arg-type]
        BlendConfig(**one, score_layers=3), BlendConfig(**one, attention_queries=1),  # type: ignore[arg-type]
        BlendConfig(**one, attention_weight=0.0), BlendConfig(**one, influence=1.0),  # type: ignore[arg-type]
        BlendConfig(**one, influence=0.5), BlendConfig(**one, attention_per_head=True),  # type: ignore[arg-type]
    ]
    for cfg in others:  # the other rankings keep the same share, of other tokens
        r = Blender(lm.model, cfg).blend(segs)  # type: ignore[arg-type]
        assert int(r.reused[r.recomputed].sum()) == keep_count(0.2, n_reused)
        assert torch.isfinite(r.logits).all()
        assert r.recomputed.tolist() != base.recomputed.tolist(), cfg


def test_ratio_015_beats_full_reuse_on_a_real_prompt(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    segs, answer = rag
    ids, answer = prompt_ids(segs), answer[:16]  # type: ignore[arg-type]
    ref = full_logits(lm, ids, answer)
    kls = {}
    for r in (0.0, 0.15):
        result = Blender(lm.model, BlendConfig(ratio=r)).blend(segs)  # type: ignore[arg-type]
        with torch.inference_mode():
            rest = lm.model(input_ids=torch.tensor([answer[:-1]]), past_key_values=result.cache(lm.model.config))
        kls[r] = kl(ref, torch.cat([result.logits[None], rest.logits[0]]))
    assert kls[0.15] < kls[0.0] / 2, kls


def test_passage_computed_behind_a_prefix(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    segs, answer = rag
    head, first, *rest = segs
    # behind the prompt's own head, the first passage's KV is exactly the full prefill's at its positions
    behind = compute_passage_kv(lm.model, first.tokens, prefix=head)  # type: ignore[union-attr, arg-type]
    assert behind.start_position == len(head)  # type: ignore[arg-type]
    assert behind.kv.shape == first.kv.shape  # type: ignore[union-attr]
    with torch.inference_mode():
        ref = lm.model(input_ids=torch.tensor([prompt_ids(segs)]), use_cache=True).past_key_values.layers
    n = len(first)  # type: ignore[arg-type]
    for i in (0, 29):
        torch.testing.assert_close(behind.kv[i, 0], ref[i].keys[0, :, len(head) : len(head) + n].transpose(0, 1),
                                   atol=2e-4, rtol=1e-4)
    # behind the opening token only: no passage opening becomes an attention sink, so full reuse errs less
    ids, answer = prompt_ids(segs), answer[:16]  # type: ignore[arg-type]
    want = full_logits(lm, ids, answer)
    passages = [first, *rest[:-1]]
    bos = [compute_passage_kv(lm.model, p.tokens, prefix=head[:1]) for p in passages]  # type: ignore[union-attr, index]
    kls = []
    for s in (segs, [head, *bos, rest[-1]]):
        result = Blender(lm.model, BlendConfig(ratio=0.0)).blend(s)  # type: ignore[arg-type]
        with torch.inference_mode():
            more = lm.model(input_ids=torch.tensor([answer[:-1]]), past_key_values=result.cache(lm.model.config))
        kls.append(kl(want, torch.cat([result.logits[None], more.logits[0]])))
    assert kls[1] < kls[0], kls


def test_passages_found_by_content_through_a_tiered_store() -> None:
    lm = require_model()
    ns = Namespace("blend-test", lm.spec)  # bfloat16 storage
    tier = CPUTier(CPUTierConfig(capacity_bytes=64 << 20), "cpu")
    with TieredStore([tier]) as store:
        cache = PassageCache(store, ns, lm.model)
        a = lm.encode("Tuples are immutable sequences, typically used to store heterogeneous data. " * 6)[:64]
        b = lm.encode("Ranges represent an immutable sequence of numbers and are used in for loops. " * 6)[:64]
        assert cache.get(a) is None
        stored, hit = cache.get_or_compute(a, start_position=0)
        assert not hit
        found, hit = cache.get_or_compute(a)
        assert hit and found.start_position == 0 and found.tokens == tuple(a)
        assert torch.equal(found.kv, stored.kv)
        entries = store.lookup_chunk_caches(ns, [a, b])
        assert entries[0] is not None and entries[0].num_tokens == 64 and entries[1] is None
        cache.put(compute_passage_kv(lm.model, b, start_position=100))  # computed elsewhere, at another position
        got_b = cache.get(b)
        assert got_b is not None and got_b.start_position == 100
        blender = Blender(lm.model, BlendConfig(ratio=0.0), spec=ns.spec)
        q = lm.encode("Which are immutable?")
        one = blender.blend([got_b, found, q])  # the same stored KV, in either order
        two = blender.blend([found, got_b, q])
        assert one.ids[:64].tolist() == b and two.ids[:64].tolist() == a
        with pytest.raises(ShapeMismatch):
            PassageCache(store, Namespace("blend-test", KVSpec(lm.spec.model, 29, 3, 64, "bfloat16")), lm.model)


def test_bad_input_errors(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidInput, match="ratio"):
            BlendConfig(ratio=bad)
    with pytest.raises(InvalidInput):
        BlendConfig(ratio=0.15, gradual=(0.2, 0.3))  # the schedule must not increase
    assert BlendConfig(ratio=0.15, gradual=(0.1,)).schedule == (0.15, 0.15)  # never below the ratio
    assert BlendConfig(ratio=1.0).schedule == (1.0, 1.0, 1.0) and BlendConfig(ratio=0.15).schedule == (0.5, 0.3, 0.15)
    with pytest.raises(InvalidInput):
        BlendConfig(check_layer=0)
    for bad_cfg in ({"score_layers": 0}, {"score_layers": 4}, {"attention_queries": -1}, {"sink_tokens": -1}):
        with pytest.raises(InvalidInput):
            BlendConfig(**bad_cfg)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="layer"):
        Blender(lm.model, BlendConfig(check_layer=30))
    with pytest.raises(ShapeMismatch):
        Blender(lm.model, spec=KVSpec(lm.spec.model, 30, 4, 64, "bfloat16"))
    blender = Blender(lm.model)
    short = compute_passage_kv(lm.model, lm.encode("Too short a passage."))
    with pytest.raises(InvalidInput, match="min_passage_tokens"):
        blender.blend([short, [1, 2, 3]])
    segs, _ = rag
    p = segs[1]
    assert isinstance(p, PassageKV)
    with pytest.raises(ShapeMismatch):
        blender.blend([PassageKV(p.tokens, p.kv[:, :, :, :2].contiguous())])
    with pytest.raises(ShapeMismatch):
        PassageKV(p.tokens[:-1], p.kv)
    with pytest.raises(InvalidInput):
        blender.blend([[]])


@pytest.mark.slow
def test_blending_is_faster_than_full_prefill(rag: tuple[list[object], list[int]]) -> None:
    lm = require_model()
    segs, _ = rag
    ids = torch.tensor([prompt_ids(segs)])  # type: ignore[arg-type]
    blender = Blender(lm.model, BlendConfig(ratio=0.15))
    times = {"blend": [], "full": []}  # type: dict[str, list[float]]
    for _ in range(3):
        t = time.perf_counter()
        blender.blend(segs)  # type: ignore[arg-type]
        times["blend"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            lm.model(input_ids=ids, logits_to_keep=1)
        times["full"].append(time.perf_counter() - t)
    assert min(times["blend"]) < min(times["full"]), times


@pytest.mark.slow
def test_bigger_prompt_quality_improves_with_ratio() -> None:
    lm = require_model()
    segs, answer = rag_segments(lm, tokens=256, count=4, seed=11)
    ids, answer = prompt_ids(segs), answer[:32]  # type: ignore[arg-type]
    ref = full_logits(lm, ids, answer)
    kls = []
    for r in (0.0, 0.15, 0.3, 1.0):
        result = Blender(lm.model, BlendConfig(ratio=r)).blend(segs)  # type: ignore[arg-type]
        with torch.inference_mode():
            rest = lm.model(input_ids=torch.tensor([answer[:-1]]), past_key_values=result.cache(lm.model.config))
        kls.append(kl(ref, torch.cat([result.logits[None], rest.logits[0]])))
    assert kls[1] < kls[0] / 3 and kls[3] < 1e-6 and kls[2] <= kls[1] * 1.2, kls
