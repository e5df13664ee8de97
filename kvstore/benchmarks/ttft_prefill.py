"""Time to first token: a prompt whose context is cached, against prefilling all of it.

For each context length N the prompt is N + ``suffix`` real tokens (a
window of ShareGPT chats in ChatML, a different window for each N). Before
timing, the context's N / C full chunks (cut from one full prefill of the
prompt, as an earlier request with the same context would have left them)
are put in each source; the timed request looks them up, loads them and
computes only the ``suffix`` tokens after them, up to the first token's
logits, and must find all N tokens in the expected tier and pick the same
first token. The baseline, timed in the same rounds, prefills all N +
suffix tokens with a fresh cache. Sources of the cached chunks:

- ``cpu``: an in-process store's CPU tier;
- ``disk``: an in-process store whose CPU tier starts empty, holds at most
  one chunk and is not filled by reads, above the LMDB disk tier the chunks
  were written to (every timed read is checked to come from ``disk``; the
  file was just written, so the OS page cache serves it);
- ``daemon``: a ``kvstore serve`` subprocess over loopback TCP.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvstore.benchmarks.common import Case, Report, Timing, measure_interleaved, say
from kvstore.benchmarks.ttft import PrefillSetup
from kvstore.benchmarks.ttft_serve import serve_process
from kvstore.builder import TiersConfig, build_store
from kvstore.client import Client
from kvstore.connectors.hf import HFConnector, PrefillResult
from kvstore.connectors.hf_backend import HFBackend, StoreBackend
from kvstore.keys import Namespace, prefix_keys
from kvstore.models.kv import cache_to_chunks, torch_dtype
from kvstore.models.prompts import chat_token_ids, iter_sharegpt
from kvstore.models.smollm2 import LoadedModel
from kvstore.tiers.store_types import StoreConfig

if TYPE_CHECKING:
    from transformers import DynamicCache

#: where the cached chunks come from -> the tier name every timed read must report
SOURCE_TIER = {"cpu": "cpu", "disk": "disk", "daemon": "cpu"}


def context_windows(lm: LoadedModel, lengths: Sequence[int], suffix: int) -> dict[int, list[int]]:
    """For each length N, N + ``suffix`` consecutive real tokens; the windows do not overlap.

    The tokens are ShareGPT chats rendered with the model's chat template, in file order.
    """
    need = sum(n + suffix for n in lengths)
    stream: list[int] = []
    for conversation in iter_sharegpt():
        stream += chat_token_ids(lm.tokenizer, conversation.turns)
        if len(stream) >= need:
            break
    out, start = {}, 0
    for n in lengths:
        out[n] = stream[start : start + n + suffix]
        start += n + suffix
    return out


@dataclass(frozen=True, slots=True)
class Context:
    """One context length: its prompt, full prefill's first-token logits, the context's chunks.

    ``chunks`` hold the KV of ``window[:tokens]`` in the namespace's dtype,
    cut from the full prefill of ``window`` (what an earlier request stored).
    """

    tokens: int
    window: list[int]
    logits: torch.Tensor
    chunks: list[torch.Tensor]


def prefill_cache(lm: LoadedModel, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Every token through the model with a fresh cache: the cache and the last position's logits."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=lm.model.config)
        out = lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits: torch.Tensor = out.logits[0, -1]
    return cache, logits


def full_prefill(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The baseline: a full prefill with a fresh cache; the first token's logits."""
    return prefill_cache(lm, ids)[1]


def prepare_contexts(lm: LoadedModel, ns: Namespace, lengths: Sequence[int], suffix: int) -> list[Context]:
    """Each context's window, reference logits and chunks (one full prefill per context)."""
    out = []
    for n, window in context_windows(lm, lengths, suffix).items():
        cache, logits = prefill_cache(lm, torch.tensor([window]))
        chunks = cache_to_chunks(cache, ns.chunk_tokens, end=n, dtype=torch_dtype(ns.spec.dtype))
        out.append(Context(n, window, logits, chunks))
    return out


def _fill(backend: HFBackend, ns: Namespace, contexts: Sequence[Context]) -> None:
    """Put every context's chunks under their prefix keys (what an earlier request would have stored)."""
    for ctx in contexts:
        stored = backend.put_many(ns, prefix_keys(ns, ctx.window[: ctx.tokens]), ctx.chunks)
        if not all(stored):
            raise RuntimeError(f"the store refused {stored.count(False)} chunks of the {ctx.tokens}-token context")
    backend.flush()


@contextlib.contextmanager
def open_sources(lm: LoadedModel, ns: Namespace, sources: Sequence[str], contexts: Sequence[Context],
                 workdir: str) -> Iterator[dict[str, HFConnector]]:
    """A connector per source, each store already holding every context's chunks."""
    budget = 2 * sum(len(c.window) for c in contexts) * ns.spec.bytes_per_token + (64 << 20)
    with contextlib.ExitStack() as stack:
        out: dict[str, HFConnector] = {}
        for source in sources:
            say(f"storing the contexts in the {source} source")
            if source == "cpu":
                store = stack.enter_context(build_store(TiersConfig(cpu_bytes=budget)))
                out[source] = stack.enter_context(HFConnector(lm, store, ns))
            elif source == "disk":
                out[source] = stack.enter_context(_disk_connector(lm, ns, workdir, budget, contexts))
            else:
                served = stack.enter_context(serve_process(workdir, budget))
                client = stack.enter_context(Client.connect(served.url, timeout_s=120))
                out[source] = stack.enter_context(HFConnector(lm, client, ns))
            if source != "disk":
                _fill(out[source].backend, out[source].ns, contexts)
        yield out


@contextlib.contextmanager
def _disk_connector(lm: LoadedModel, ns: Namespace, workdir: str, budget: int,
                    contexts: Sequence[Context]) -> Iterator[HFConnector]:
    """Write the contexts through a store with a disk tier, then read through one whose CPU tier stays empty."""
    path = os.path.join(workdir, "disk")
    with build_store(TiersConfig(cpu_bytes=budget, data_dir=path, disk_bytes=budget)) as writer:
        backend = StoreBackend(writer)
        _fill(backend, backend.register(ns), contexts)
    tiers = TiersConfig(cpu_bytes=ns.chunk_nbytes + 4096, data_dir=path, disk_bytes=budget)
    with build_store(tiers, StoreConfig(promote_on_hit=False)) as reader, HFConnector(lm, reader, ns) as connector:
        yield connector


def _checked(result: PrefillResult, context: int, source: str) -> PrefillResult:
    if result.hit_tokens != context or set(result.tiers) != {SOURCE_TIER[source]}:
        raise RuntimeError(
            f"{source}: expected {context} cached tokens from tier {SOURCE_TIER[source]!r}, "
            f"got {result.hit_tokens} from {set(result.tiers)}"
        )
    return result


def measure_ttft(lm: LoadedModel, ns: Namespace, setup: PrefillSetup, report: Report, workdir: str) -> None:
    """Time full prefill and each source at each context length, interleaved; record the speedups."""
    say(f"prefilling the contexts {', '.join(map(str, setup.contexts))} once")
    contexts = prepare_contexts(lm, ns, setup.contexts, setup.suffix)
    with open_sources(lm, ns, setup.sources, contexts, workdir) as connectors:
        cases: dict[str, Case] = {}
        worst = 0.0
        for ctx in contexts:
            n, window = ctx.tokens, ctx.window
            cases[f"full_{n}"] = Case(_full_case(lm, torch.tensor([window])))
            for source, connector in connectors.items():
                got = _checked(connector.prefill(window), n, source)
                if int(got.logits.argmax()) != int(ctx.logits.argmax()):
                    raise RuntimeError(f"{source} at {n} tokens: the first token differs from full prefill's")
                worst = max(worst, float((got.logits - ctx.logits).abs().max()))
                cases[f"{source}_{n}"] = Case(_cached_case(connector, window, n, source))
        say(f"timing {len(cases)} cases x {setup.iters} rounds (+{setup.warmup} warm-up)")
        timings = measure_interleaved(cases, iters=setup.iters, warmup=setup.warmup)
    report.record("ttft_logits_max_abs_diff", round(worst, 6))
    for ctx in contexts:
        _record(report, timings, ctx.tokens, setup.sources)


def _full_case(lm: LoadedModel, ids: torch.Tensor) -> Callable[[int], object]:
    return lambda i: full_prefill(lm, ids)


def _cached_case(connector: HFConnector, window: list[int], n: int, source: str) -> Callable[[int], object]:
    return lambda i: _checked(connector.prefill(window), n, source)


def _record(report: Report, timings: dict[str, Timing], n: int, sources: Sequence[str]) -> None:
    full = timings[f"full_{n}"].median
    report.record(f"ttft_full_{n}_ms", round(full * 1e3, 2))
    for source in sources:
        ours = timings[f"{source}_{n}"].median
        speedup = full / ours
        report.record(f"ttft_{source}_{n}_ms", round(ours * 1e3, 2))
        report.record(f"ttft_speedup_{source}_{n}", round(speedup, 2))
        label = f"TTFT {n} ctx, cached in {source}"
        report.row(label, f"{ours * 1e3:.1f} ms", f"full prefill {full * 1e3:.0f} ms", f"{speedup:.1f}x",
                   f"ttft_speedup_{source}_{n}")
        say(f"{label:<40} {ours * 1e3:10.1f} ms   vs full prefill {full * 1e3:8.0f} ms   {speedup:6.1f}x")
