"""Re-rotating cached keys from the positions they were computed at to new ones.

RoPE rotates each pair of a key's dimensions by ``position * inv_freq[i]``.
Rotations of one plane compose by adding angles, so a key computed at
position ``p`` becomes the key at ``q`` by rotating it by ``(q - p) * inv_freq``
— exactly, whatever the layer (values carry no position and are left alone).

Two pairings of the dimensions exist: NeoX / Llama (``rotate_half``: dimension
``i`` pairs with ``i + d/2``) and GPT-J (interleaved: ``2i`` pairs with
``2i + 1``). Only the first ``rotary_dim`` dimensions rotate (partial rotary).

Scaling: any RoPE variant whose frequencies do not depend on the sequence is
a pure rotation per position and shifts exactly (``default``, ``linear``,
``llama3``, ``yarn`` — yarn's attention factor scales K at every position alike
and survives a rotation). ``dynamic`` and ``longrope`` change the frequencies
with the sequence length, so a key cannot be moved without recomputing it:
they are refused with :class:`RopeScalingUnsupported`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from kvstore.errors import InvalidInput, ShapeMismatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RotaryVariant = Literal["neox", "gptj"]
SHIFTABLE = frozenset({"default", "linear", "llama3", "yarn"})
REFUSED = {
    "dynamic": "dynamic NTK scaling changes the frequencies with the sequence length",
    "longrope": "longrope switches between short and long factors with the sequence length",
}


class RopeScalingUnsupported(InvalidInput):
    """The model's RoPE scaling makes a key's rotation depend on more than its position."""


@dataclass(frozen=True, slots=True, eq=False)
class RopeSpec:
    """How a model rotates its keys.

    Invariants: ``inv_freq`` is a 1-D float tensor of ``rotary_dim // 2``
    frequencies (the ones the model itself uses, scaling included);
    ``rotary_dim`` is even and at most ``head_dim``.
    """

    variant: RotaryVariant
    inv_freq: torch.Tensor
    head_dim: int
    rotary_dim: int

    def __post_init__(self) -> None:
        if self.variant not in ("neox", "gptj"):
            raise InvalidInput(f"unknown rotary variant {self.variant!r}; one of ('neox', 'gptj')")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise InvalidInput(f"rotary_dim {self.rotary_dim} must be even and in (0, {self.head_dim}]")
        if tuple(self.inv_freq.shape) != (self.rotary_dim // 2,):
            raise ShapeMismatch(f"inv_freq has shape {tuple(self.inv_freq.shape)}, need ({self.rotary_dim // 2},)")

    @classmethod
    def standard(cls, head_dim: int, theta: float, variant: RotaryVariant = "neox") -> RopeSpec:
        """Unscaled RoPE over the whole head: ``inv_freq[i] = theta ** (-2i / head_dim)``."""
        exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return cls(variant, (1.0 / theta**exps).float(), head_dim, head_dim)


def rope_from_model(model: PreTrainedModel) -> RopeSpec:
    """The RoPE of a Llama-style transformers model (NeoX pairing, the model's own frequencies).

    Raises:
        RopeScalingUnsupported: a scaling kind whose rotation is not a function of position alone.
        InvalidInput: the model has no rotary embedding where Llama keeps it.
    """
    config = model.config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None) or {}
    kind = str(params.get("rope_type", "default"))
    if kind in REFUSED:
        raise RopeScalingUnsupported(f"cannot shift keys under rope_type {kind!r}: {REFUSED[kind]}")
    if kind not in SHIFTABLE:
        raise RopeScalingUnsupported(f"rope_type {kind!r} is not known to be shiftable; known: {sorted(SHIFTABLE)}")
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise InvalidInput("the model has no model.rotary_emb.inv_freq (not a Llama-style model)")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return RopeSpec("neox", inv_freq.detach().float().cpu(), head_dim, 2 * int(inv_freq.numel()))


def shift_angles(rope: RopeSpec, delta: torch.Tensor | int, device: torch.device | None = None) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """``cos`` and ``sin`` of ``delta * inv_freq`` (float64 angles), shape ``[tokens, rotary_dim/2]``."""
    d = torch.as_tensor(delta, dtype=torch.float64).reshape(-1, 1)
    angles = d * rope.inv_freq.to(torch.float64).reshape(1, -1)
    cos, sin = angles.cos().float(), angles.sin().float()
    return (cos.to(device), sin.to(device)) if device is not None else (cos, sin)


def shift_keys(keys: torch.Tensor, delta: torch.Tensor | int, rope: RopeSpec) -> torch.Tensor:
    """Keys rotated by ``delta`` positions (a new tensor; the input is not changed).

    Args:
        keys: ``[..., tokens, heads, head_dim]`` (kvstore's chunk layout puts
            tokens before heads), float.
        delta: one shift for every token, or one per token (``[tokens]``),
            e.g. ``new_start - old_start``.
        rope: the model's rotation.
    Raises:
        ShapeMismatch: the last dimension is not ``rope.head_dim`` or ``delta`` has the wrong length.
    """
    if keys.dim() < 3 or keys.shape[-1] != rope.head_dim:
        raise ShapeMismatch(f"keys must be [..., tokens, heads, {rope.head_dim}], got {tuple(keys.shape)}")
    tokens = keys.shape[-3]
    cos, sin = shift_angles(rope, delta, keys.device)
    if cos.shape[0] not in (1, tokens):
        raise ShapeMismatch(f"{cos.shape[0]} shifts given for {tokens} tokens")
    return rotate_pairs(keys, cos[:, None, :], sin[:, None, :], rope)


def rotate_pairs(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """``keys`` (last dimension ``head_dim``) with each rotary pair turned by the angles of ``cos``/``sin``.

    ``cos``/``sin`` hold ``rotary_dim // 2`` values in their last dimension and
    broadcast against ``keys[..., :rotary_dim // 2]`` (e.g. ``[tokens, 1, r/2]``
    for ``[tokens, heads, head_dim]`` keys, ``[tokens, r/2]`` for
    ``[heads, tokens, head_dim]``). Negate ``sin`` to turn the other way.
    Returns a new tensor; dimensions past ``rotary_dim`` are copied.
    """
    cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)
    out = keys.clone()
    r = rope.rotary_dim
    if rope.variant == "neox":
        a, b = keys[..., : r // 2], keys[..., r // 2 : r]
        out[..., : r // 2] = a * cos - b * sin
        out[..., r // 2 : r] = b * cos + a * sin
    else:
        a, b = keys[..., 0:r:2], keys[..., 1:r:2]
        out[..., 0:r:2] = a * cos - b * sin
        out[..., 1:r:2] = b * cos + a * sin
    return out


def shift_keys_into(out: torch.Tensor, keys: torch.Tensor, delta: int, rope: RopeSpec) -> None:
    """Write ``keys`` rotated by one shift of ``delta`` positions into ``out`` (same shape, any layout).

    The arithmetic of :func:`shift_keys` without its copies: ``keys`` may be a
    strided view (e.g. a passage's K transposed to ``[layers, heads, tokens,
    head_dim]``) of any float dtype, ``out`` a float32 view of the assembled
    prompt's K; a single shift rotates every token alike, so any axis order works.

    Raises:
        ShapeMismatch: the shapes differ or the last dimension is not ``rope.head_dim``.
    """
    if keys.shape != out.shape or keys.shape[-1] != rope.head_dim:
        raise ShapeMismatch(f"keys {tuple(keys.shape)} and out {tuple(out.shape)} must match, last dim {rope.head_dim}")
    cos, sin = shift_angles(rope, int(delta), out.device)
    cos, sin = cos.reshape(-1).to(out.dtype), sin.reshape(-1).to(out.dtype)
    r = rope.rotary_dim
    if rope.variant == "neox":
        lo, hi = slice(0, r // 2), slice(r // 2, r)
    else:
        lo, hi = slice(0, r, 2), slice(1, r, 2)
    a, b = keys[..., lo].to(out.dtype), keys[..., hi].to(out.dtype)
    torch.sub(a * cos, b * sin, out=out[..., lo])
    torch.add(b * cos, a * sin, out=out[..., hi])
    if r < rope.head_dim:
        out[..., r:] = keys[..., r:]


def apply_rope(keys: torch.Tensor, positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Rotate position-free keys to ``positions``: the shift from position 0 (a reference formula)."""
    return shift_keys(keys, positions, rope)
