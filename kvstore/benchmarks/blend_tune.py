"""Quality of blending variants on many RAG prompts, for tuning ``BlendConfig`` (no timing).

``python -m kvstore.benchmarks.blend_tune --seeds 1 2 --variants default prefix-bos ...``
builds the workload of ``kvstore bench blend`` (``build_prompts``) for each
seed, computes each prompt's full-prefill reference once (kept as ``.npy``
under ``--cache-dir``, so later runs over the same prompts skip it), and
reports for each variant the KL and top-1 agreement over the last prompt
token and the teacher-forced answer tokens, pooled over all prompts, with the
spread of the per-prompt top-1. Tune on some seeds, confirm on others.

A variant is a passage-KV mode (how each passage is computed on its own:
``none``, nothing before it; ``bos``, behind the prompt's first token; ``head``,
behind the prompt's whole uncached head) and ``BlendConfig`` fields.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvstore.benchmarks.blend import BlendBenchConfig
from kvstore.benchmarks.blend_run import RagPrompt, build_prompts
from kvstore.blend.blender import Blender
from kvstore.blend.config import BlendConfig
from kvstore.blend.passages import compute_passage_kv
from kvstore.blend.segments import PassageKV, Segment
from kvstore.models.smollm2 import LoadedModel, load_smollm2, torch_threads


@dataclass(frozen=True, slots=True)
class Variant:
    """How passages are computed (``prefix``: none / bos / head) and the blender's config fields."""

    prefix: str = "none"
    fields: dict[str, Any] = field(default_factory=dict)


def _v(prefix: str = "none", **fields: Any) -> Variant:
    return Variant(prefix, fields)


VARIANTS: dict[str, Variant] = {
    "r0": _v(ratio=0.0),
    "default": _v(),
    "r03": _v(ratio=0.3),
    "bos-r0": _v("bos", ratio=0.0),
    "bos": _v("bos"),
    "bos-r005": _v("bos", ratio=0.05),
    "bos-r03": _v("bos", ratio=0.3),
    "head-r0": _v("head", ratio=0.0),
    "head": _v("head"),
    "head-r03": _v("head", ratio=0.3),
    "bos-sink4": _v("bos", sink_tokens=4),
    "bos-v": _v("bos", deviation="v"),
    "bos-k": _v("bos", deviation="k"),
    "bos-hn": _v("bos", deviation="kv_head_norm"),
    "bos-nograd": _v("bos", gradual=()),
    "bos-grad5": _v("bos", gradual=(0.5, 0.3)),
    "bos-c2": _v("bos", check_layer=2),
    "bos-c4": _v("bos", check_layer=4),
    "bos-w0": _v("bos", attention_weight=0.0),
    "bos-w1": _v("bos", attention_weight=1.0),
    "bos-pp": _v("bos", per_passage=True),
    "bos-q1": _v("bos", attention_queries=1),
    "sink4": _v(sink_tokens=4),
    "c1-g532": _v(check_layer=1, gradual=(0.5, 0.3, 0.2)),
    "c2-g53": _v(check_layer=2, gradual=(0.5, 0.3)),
    "g532": _v(gradual=(0.5, 0.3, 0.2)),
    "g5": _v(gradual=(0.5,)),
    "g42": _v(gradual=(0.4, 0.2)),
    "bos-g532": _v("bos", gradual=(0.5, 0.3, 0.2)),
    "v": _v(deviation="v"),
    "hn": _v(deviation="kv_head_norm"),
    "inf": _v(influence=1.0),
    "inf-g532": _v(influence=1.0, gradual=(0.5, 0.3, 0.2)),
    "bos-inf": _v("bos", influence=1.0),
    "mix": _v(influence=0.5),
    "mix-g532": _v(influence=0.5, gradual=(0.5, 0.3, 0.2)),
    "bos-mix": _v("bos", influence=0.5),
    "w1": _v(attention_weight=1.0),
    "w025": _v(attention_weight=0.25),
    "w0": _v(attention_weight=0.0),
    "ph": _v(attention_per_head=True),
    "nodrift": _v(drift=0.0),
    "nodrift-g532": _v(drift=0.0, gradual=(0.5, 0.3, 0.2)),
    "d03": _v(drift=0.3),
    "d04": _v(drift=0.4),
    "d06": _v(drift=0.6),
    "dv": _v(drift_values=True),
    "d-r005": _v(ratio=0.05),
    "d-r02": _v(ratio=0.2),
    "d-r03": _v(ratio=0.3),
    "nodrift-r005": _v(ratio=0.05, drift=0.0),
    "nodrift-r03": _v(ratio=0.3, drift=0.0),
    "d-g532": _v(gradual=(0.5, 0.3, 0.2)),
    "d-bos": _v("bos"),
    "d-nograd": _v(gradual=()),
    "d-c2": _v(check_layer=2),
    "d-c2-g5": _v(check_layer=2, gradual=(0.5, 0.3)),
    "c3": _v(check_layer=3, gradual=(0.3,)),
    "c3-nodrift": _v(check_layer=3, gradual=(0.3,), drift=0.0),
    "c3-d04": _v(check_layer=3, gradual=(0.3,), drift=0.4),
    "c2": _v(check_layer=2, gradual=(0.3,)),
}


@dataclass(slots=True)
class Score:
    kl_sum: float = 0.0
    agree: int = 0
    tokens: int = 0
    per_prompt: list[float] = field(default_factory=list)


def _reference(lm: LoadedModel, ids: list[int], prompt: RagPrompt, path: Path) -> torch.Tensor:
    if path.exists():
        return torch.from_numpy(np.load(path))
    with torch.inference_mode():
        ref = lm.model(input_ids=torch.tensor([ids + prompt.answer[:-1]])).logits[0, len(ids) - 1 :]
    lp = torch.log_softmax(ref.float(), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, lp.numpy())
    return lp


def _passages(lm: LoadedModel, pool: list[tuple[int, ...]], prefix: list[int]) -> list[PassageKV]:
    return [compute_passage_kv(lm.model, p, prefix=prefix) for p in pool]


def run(
    seeds: list[int], prompts: int, names: list[str], cache_dir: Path, passage_tokens: int, passages: int,
    first: int = 0,
) -> None:
    """Score every named variant on ``prompts`` prompts of each seed; prints one JSON line per run, then a table."""
    lm = load_smollm2("float32")
    scores = {n: Score() for n in names}
    for seed in seeds:
        cfg = BlendBenchConfig(prompts=prompts, passages=passages, pool=passages + 2, passage_tokens=passage_tokens,
                               answer_tokens=64, iters=1, warmup=0, seed=seed)
        pool, rag = build_prompts(lm, cfg)
        kv_by_mode: dict[str, list[PassageKV]] = {}
        for n, prompt in enumerate(rag):
            if n < first:
                continue
            ids = prompt.head + [t for i in prompt.order for t in pool[i]] + prompt.tail
            ref = _reference(lm, ids, prompt, cache_dir / f"s{seed}-{passages}x{passage_tokens}-p{n}.npy")
            for name in names:
                var = VARIANTS[name]
                if var.prefix not in kv_by_mode:
                    prefix = {"none": [], "bos": prompt.head[:1], "head": prompt.head}[var.prefix]
                    kv_by_mode[var.prefix] = _passages(lm, pool, prefix)
                kvs = kv_by_mode[var.prefix]
                segs: list[Segment] = [prompt.head, *(kvs[i] for i in prompt.order), prompt.tail]
                blender = Blender(lm.model, BlendConfig(**var.fields))
                with torch.inference_mode():
                    result = blender.blend(segs)
                    rest = lm.model(input_ids=torch.tensor([prompt.answer[:-1]]),
                                    past_key_values=result.cache(lm.model.config))
                    lp = torch.log_softmax(torch.cat([result.logits[None], rest.logits[0]]).float(), -1)
                kl = float((ref.exp() * (ref - lp)).sum())
                agree = int((lp.argmax(-1) == ref.argmax(-1)).sum())
                s = scores[name]
                s.kl_sum += kl
                s.agree += agree
                s.tokens += int(lp.shape[0])
                s.per_prompt.append(agree / lp.shape[0])
                print(json.dumps({"seed": seed, "prompt": n, "variant": name, "kl": round(kl / lp.shape[0], 5),
                                  "top1": round(agree / lp.shape[0], 4)}), file=sys.stderr, flush=True)
    print(f"seeds {seeds}, {prompts} prompts each, {passages} x {passage_tokens}")
    print("| variant | KL | top-1 | per-prompt top-1 min / median / max |")
    print("| --- | --- | --- | --- |")
    for name in names:
        s = scores[name]
        pp = s.per_prompt
        print(f"| {name} | {s.kl_sum / s.tokens:.4f} | {s.agree / s.tokens:.1%} | "
              f"{min(pp):.1%} / {statistics.median(pp):.1%} / {max(pp):.1%} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstore.benchmarks.blend_tune", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--passage-tokens", type=int, default=512)
    parser.add_argument("--first-prompt", type=int, default=0, help="skip the prompts before this one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "kvstore-blend-tune",
                        help="where full-prefill references are kept between runs")
    parser.add_argument("--variants", nargs="+", default=["r0", "default"], choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        run(args.seeds, args.prompts, args.variants, args.cache_dir, args.passage_tokens, args.passages,
            args.first_prompt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
