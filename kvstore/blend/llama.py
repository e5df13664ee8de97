"""One decoder layer of a transformers Llama model, run on a subset of a prompt's tokens.

The blender drives ``model.model.layers[i]`` module by module (norms,
``self_attn.q_proj/k_proj/v_proj/o_proj``, ``mlp``) with ``model.model.rotary_emb``
and transformers' own ``apply_rotary_pos_emb``, so the arithmetic is the
model's; nothing in transformers is patched. What differs from the model's
forward is only which tokens are computed: the queries of a layer are any
subset of the prompt's positions, and they attend to the whole assembled KV
(reused K/V, with the recomputed tokens' K/V written over it at their
positions) under a causal mask by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvstore.errors import InvalidInput, ShapeMismatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED = ("llama",)
ATTENTION_BLOCKS = 8
"""Runs the selected tokens' queries are cut into for attention (see :func:`sparse_attention`)."""


@dataclass(frozen=True, slots=True)
class LayerQKV:
    """Projections of the computed tokens at one layer: q ``[1, heads, n, d]``, k/v ``[1, kv_heads, n, d]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class LlamaStack:
    """The decoder of a Llama-architecture ``PreTrainedModel``, layer by layer.

    Invariant: it only reads the model's modules; ``model`` stays in eval mode.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        kind = getattr(model.config, "model_type", None)
        if kind not in SUPPORTED:
            raise InvalidInput(f"blending runs {SUPPORTED} models, got model_type {kind!r}")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self._rope = apply_rotary_pos_emb
        cfg = model.config
        self.num_layers = len(self.layers)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[1, n, hidden]`` of token ids ``[n]``."""
        out: torch.Tensor = self.inner.embed_tokens(ids.reshape(1, -1))
        return out

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's RoPE ``cos``/``sin`` at ``positions`` (the same for every layer: compute once per token set)."""
        ref = self.inner.embed_tokens.weight
        probe = torch.empty(0, dtype=ref.dtype, device=ref.device)
        cos, sin = self.inner.rotary_emb(probe, positions.reshape(1, -1))
        return cos, sin

    def qkv(self, i: int, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> LayerQKV:
        """Layer ``i``'s rotated queries and keys and its values for hidden states ``h``.

        ``rotary`` is :meth:`rotary` of the tokens' positions.
        """
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (1, x.shape[1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self._rope(q, k, *rotary)
        return LayerQKV(q, k, v)

    def attention_plan(self, positions: torch.Tensor) -> SparseAttention:
        """A :class:`SparseAttention` plan for queries at ``positions`` of this model's heads."""
        cfg = self.model.config
        return SparseAttention.plan(positions, int(cfg.num_attention_heads) // self.num_kv_heads,
                                    dtype=self.inner.embed_tokens.weight.dtype)

    def finish(
        self, i: int, h: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        attention: SparseAttention | None,
    ) -> torch.Tensor:
        """Attention of queries ``q`` over all of ``keys``/``values``, then the MLP; returns new ``h``.

        ``attention`` is the plan for the queries' prompt positions (each sees
        keys at positions <= its own); None means the queries are every token
        in order (plain causal attention).
        """
        layer = self.layers[i]
        attn = layer.self_attn
        if attention is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=attn.scaling, enable_gqa=True)
        else:
            out = attention(q, keys, values, attn.scaling)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(1, q.shape[2], -1))
        new_h: torch.Tensor = h + layer.mlp(layer.post_attention_layernorm(h))
        return new_h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[n, vocab]`` of hidden states ``[1, n, hidden]``."""
        out: torch.Tensor = self.model.lm_head(self.inner.norm(h))[0]
        return out


@dataclass(frozen=True, slots=True, eq=False)
class AttentionRun:
    """Queries ``lo .. hi-1`` of a plan: they read keys ``0 .. end-1``; ``mask`` is additive
    ``[1, 1, groups * (hi-lo), end]`` (0 or -inf), None where every query sees every one of those keys."""

    lo: int
    hi: int
    end: int
    mask: torch.Tensor | None


@dataclass(frozen=True, slots=True, eq=False)
class SparseAttention:
    """Causal attention of queries at given prompt positions over a whole prompt's K/V, planned once.

    The queries (ascending positions) are cut into runs; each run attends only
    to the keys up to its last position, under a mask built here once and
    reused by every layer that computes the same tokens. The ``groups`` query
    heads that share a K/V head (GQA; query head ``h`` reads K/V head
    ``h // groups``, as ``repeat_kv`` does) are stacked into one head's rows,
    so each K/V head is read once per run. Same result as one dense masked call.
    """

    positions: torch.Tensor
    groups: int
    runs: tuple[AttentionRun, ...]

    @classmethod
    def plan(cls, positions: torch.Tensor, groups: int, blocks: int = ATTENTION_BLOCKS,
             dtype: torch.dtype = torch.float32) -> SparseAttention:
        """Plan for queries at ``positions`` (1-D, ascending), ``groups`` query heads per K/V head.

        Raises:
            InvalidInput: no positions, positions not ascending, or ``groups``/``blocks`` < 1.
        """
        n = int(positions.numel())
        if n == 0 or groups < 1 or blocks < 1:
            raise InvalidInput(
                f"attention plan needs positions, groups >= 1 and blocks >= 1 (got {n}, {groups}, {blocks})"
            )
        positions = positions.reshape(-1)
        if n > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise InvalidInput("attention plan positions must be strictly ascending")
        bounds = [round(n * b / blocks) for b in range(blocks + 1)]
        runs = []
        for lo, hi in pairwise(bounds):
            if hi <= lo:
                continue
            pos = positions[lo:hi]
            end = int(pos[-1]) + 1
            hidden = torch.arange(end, device=positions.device)[None, :] > pos[:, None]
            mask = None
            if bool(hidden.any()):
                add = torch.zeros(hidden.shape, dtype=dtype, device=positions.device)
                mask = add.masked_fill_(hidden, float("-inf")).repeat(groups, 1)[None, None]
            runs.append(AttentionRun(lo, hi, end, mask))
        return cls(positions, groups, tuple(runs))

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """``q`` ``[1, heads, n, d]`` at the planned positions, ``keys``/``values`` ``[1, kv_heads, T, d]``;
        returns ``[1, heads, n, d]`` (a view of a ``[1, n, heads, d]`` tensor).

        Raises:
            ShapeMismatch: ``q`` is not for the planned positions or head grouping.
        """
        b, heads, n, d = q.shape
        kv_heads, g = keys.shape[1], self.groups
        if b != 1 or n != self.positions.numel() or heads != kv_heads * g:
            raise ShapeMismatch(f"queries {tuple(q.shape)} do not fit a plan for {self.positions.numel()} "
                                f"positions and {g} query heads per K/V head over {kv_heads}")
        grouped = q.reshape(1, kv_heads, g, n, d)
        out = torch.empty(1, n, kv_heads, g, d, dtype=q.dtype, device=q.device)
        for run in self.runs:
            r = run.hi - run.lo
            rows = grouped[:, :, :, run.lo : run.hi].reshape(1, kv_heads, g * r, d)
            o = F.scaled_dot_product_attention(rows, keys[:, :, : run.end], values[:, :, : run.end],
                                               attn_mask=run.mask, scale=scale)
            out[:, run.lo : run.hi] = o.view(1, kv_heads, g, r, d).permute(0, 3, 1, 2, 4)
        return out.view(1, n, heads, d).transpose(1, 2)


def sparse_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float,
    blocks: int = ATTENTION_BLOCKS,
) -> torch.Tensor:
    """Causal attention of queries at ``positions`` (ascending) over the whole prompt's ``keys``/``values``.

    One-off form of :class:`SparseAttention` (plan, then run): each run of
    queries reads only the keys up to its last position, so keys past a run
    are never touched (about half the work of one dense masked call when the
    queries are spread over the prompt). Same result as the dense call.
    ``q`` ``[1, heads, n, d]``, ``keys``/``values`` ``[1, kv_heads, T, d]``; returns ``[1, heads, n, d]``.
    """
    plan = SparseAttention.plan(positions, q.shape[1] // keys.shape[1], blocks, q.dtype)
    return plan(q, keys, values, scale)
