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

from kvstore.errors import InvalidInput

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

    def qkv(self, i: int, h: torch.Tensor, positions: torch.Tensor) -> LayerQKV:
        """Layer ``i``'s rotated queries and keys and its values for hidden states ``h`` at ``positions``."""
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (1, x.shape[1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = self.inner.rotary_emb(x, positions.reshape(1, -1))
        q, k = self._rope(q, k, cos, sin)
        return LayerQKV(q, k, v)

    def finish(
        self, i: int, h: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of queries ``q`` over all of ``keys``/``values``, then the MLP; returns new ``h``.

        ``positions`` are the queries' prompt positions (each sees keys at
        positions <= its own); None means the queries are every token in order
        (plain causal attention).
        """
        layer = self.layers[i]
        attn = layer.self_attn
        if positions is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=attn.scaling, enable_gqa=True)
        else:
            out = sparse_attention(q, keys, values, positions, attn.scaling)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(1, q.shape[2], -1))
        new_h: torch.Tensor = h + layer.mlp(layer.post_attention_layernorm(h))
        return new_h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[n, vocab]`` of hidden states ``[1, n, hidden]``."""
        out: torch.Tensor = self.model.lm_head(self.inner.norm(h))[0]
        return out


def sparse_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scale: float,
    blocks: int = ATTENTION_BLOCKS,
) -> torch.Tensor:
    """Causal attention of queries at ``positions`` (ascending) over the whole prompt's ``keys``/``values``.

    The queries are cut into ``blocks`` runs; each run attends only to the
    keys up to its last position (a mask handles the rest), so keys past a
    run are never touched: about half the work of one dense masked call when
    the queries are spread over the prompt. Same result as the dense call.
    ``q`` ``[1, heads, n, d]``, ``keys``/``values`` ``[1, kv_heads, T, d]``; returns ``[1, heads, n, d]``.
    """
    n = q.shape[2]
    bounds = [round(n * b / blocks) for b in range(blocks + 1)]
    outs = []
    for lo, hi in pairwise(bounds):
        if hi <= lo:
            continue
        pos = positions[lo:hi]
        end = int(pos[-1]) + 1
        mask = torch.arange(end, device=q.device)[None, :] <= pos[:, None]
        outs.append(F.scaled_dot_product_attention(
            q[:, :, lo:hi], keys[:, :, :end], values[:, :, :end], attn_mask=mask[None, None], scale=scale,
            enable_gqa=True,
        ))
    return torch.cat(outs, dim=2)
