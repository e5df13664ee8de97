"""Passage KV in a TieredStore, under the content key of the passage's tokens.

A passage's KV is computed on its own (no tokens before it) at positions
``start_position ..`` and stored with ``TieredStore.put_chunk_cache``: the key
is the content hash of the tokens alone (``kvstore.keys.content_key``), so the
same passage is found wherever it recurs in later prompts; the index records
the positions it was computed at, which the blender rotates away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvstore.blend.segments import PassageKV
from kvstore.errors import InvalidInput, ShapeMismatch
from kvstore.keys import ChunkKey, Namespace
from kvstore.models.kv import cache_to_chunk, torch_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvstore.tiers.store import TieredStore


def compute_passage_kv(
    model: PreTrainedModel, tokens: Sequence[int], start_position: int = 0, prefix: Sequence[int] = ()
) -> PassageKV:
    """The passage's KV computed on its own (float32, chunk layout).

    With no ``prefix`` the passage sits at positions ``start_position ..`` with
    nothing before it. With a ``prefix`` (e.g. the opening token every prompt
    starts with), ``prefix + tokens`` is computed at ``start_position ..`` and
    only the passage's own tokens' KV is kept, at the positions it was computed
    at (``start_position + len(prefix) ..``): the passage's first tokens then
    attend to the prefix's attention sink as they will in a prompt, instead of
    becoming sinks themselves.

    Raises:
        InvalidInput: no tokens, or a negative start position.
    """
    ids = [int(t) for t in tokens]
    pre = [int(t) for t in prefix]
    if not ids:
        raise InvalidInput("a passage needs at least one token")
    if start_position < 0:
        raise InvalidInput(f"start_position must be >= 0, got {start_position}")
    with torch.inference_mode():
        n = len(pre) + len(ids)
        positions = torch.arange(start_position, start_position + n).reshape(1, -1)
        out = model(input_ids=torch.tensor([pre + ids]), position_ids=positions, use_cache=True, logits_to_keep=1)
        kv = cache_to_chunk(out.past_key_values, len(pre), dtype=torch.float32)
    return PassageKV(tuple(ids), kv, start_position + len(pre))


class PassageCache:
    """Passages' KV stored in, and found again through, a ``TieredStore``'s chunk-cache index.

    Invariant: what it stores has the namespace's spec (shape and dtype); KV
    is cast to the spec's dtype on the way in and to float32 on the way out.
    """

    def __init__(self, store: TieredStore, ns: Namespace, model: PreTrainedModel) -> None:
        """Raises ShapeMismatch when the namespace's spec is not this model's KV geometry."""
        cfg = model.config
        heads = int(cfg.num_attention_heads)
        want = (int(cfg.num_hidden_layers), int(cfg.num_key_value_heads),
                int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads), "kv_separate")
        got = (ns.spec.num_layers, ns.spec.num_kv_heads, ns.spec.head_dim, ns.spec.layout)
        if got != want:
            raise ShapeMismatch(f"namespace spec (layers, kv_heads, head_dim, layout) = {got}, the model has {want}")
        self.store, self.ns, self.model = store, ns, model
        self.dtype = torch_dtype(ns.spec.dtype)
        store.register_namespace(ns)

    def put(self, passage: PassageKV) -> ChunkKey:
        """Store a passage's KV (cast to the spec's dtype); returns its content key."""
        data = passage.kv.to(self.dtype).contiguous()
        return self.store.put_chunk_cache(self.ns, list(passage.tokens), data, passage.start_position)

    def compute(self, tokens: Sequence[int], start_position: int = 0) -> PassageKV:
        """Compute a passage's KV on its own and store it; returns it as stored (in the spec's dtype, as float32)."""
        passage = compute_passage_kv(self.model, tokens, start_position)
        self.put(passage)
        return PassageKV(passage.tokens, passage.kv.to(self.dtype).float(), start_position)

    def get(self, tokens: Sequence[int]) -> PassageKV | None:
        """The stored KV of a passage (float32), wherever it was computed; None when not stored."""
        return self.get_many([tokens])[0]

    def get_many(self, passages: Sequence[Sequence[int]]) -> list[PassageKV | None]:
        """:meth:`get` for each passage, through one index lookup."""
        lists = [[int(t) for t in p] for p in passages]
        entries = self.store.lookup_chunk_caches(self.ns, lists)
        out: list[PassageKV | None] = []
        for ids, entry in zip(lists, entries):
            if entry is None or entry.num_tokens != len(ids):
                out.append(None)
                continue
            buf = torch.empty(self.ns.spec.chunk_shape(len(ids)), dtype=self.dtype)
            got = self.store.get(self.ns, entry.key, buf)
            out.append(PassageKV(tuple(ids), buf.float(), entry.start_position) if got is not None else None)
        return out

    def get_or_compute(self, tokens: Sequence[int], start_position: int = 0) -> tuple[PassageKV, bool]:
        """The stored passage, or computed and stored now; the flag says whether it was a hit."""
        found = self.get(tokens)
        return (found, True) if found is not None else (self.compute(tokens, start_position), False)
