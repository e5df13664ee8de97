"""Per-channel sensitivity of a model to errors in its KV: what sets cachegen's calibrated steps.

The error a quantizer adds to channel ``i`` of the context KV changes the
model's next-token distributions by, to second order, ``KL ~ 1/2 * sum_i F_i *
err_i^2`` where ``F_i`` is the diagonal of the Fisher information of those
distributions with respect to the KV. A uniform quantizer of step ``s_i`` adds
``s_i^2 / 12`` of squared error, so for a given size the smallest KL comes
with ``s_i ~ 1 / sqrt(F_i)`` (every channel then adds the same share of KL;
cachegen_params.step_targets). This module estimates ``F_i`` per (slab,
channel): the context is prefilled, its KV made a leaf tensor, the
continuation run teacher-forced on top, targets sampled from the model's own
distribution at every position (so that cross terms vanish in expectation),
and the squared gradient of their summed log-probabilities with respect to
the KV averaged over ``draws`` samples and over the context's tokens (the first
``skip`` tokens excluded: they are stored exactly) and divided by the number
of scored positions.

Convention (the levels' ``LEVEL_LAMBDA`` assume it): sensitivities scaled to
2,048-token contexts (per-token sensitivity falls roughly as 1 / context
length; each prompt's estimate is multiplied by its context length over
2,048), continuations of about 256 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvstore.codecs.cachegen_params import F64
from kvstore.errors import InvalidInput
from kvstore.models.kv import cache_to_chunk, chunks_to_cache
from kvstore.models.smollm2 import LoadedModel


def calibrate(
    loaded: LoadedModel,
    prompts: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    draws: int = 4,
    skip: int = 1,
    seed: int = 0,
    channel_weight: float = 0.5,
    reference_tokens: int = 2048,
) -> F64:
    """Mean per-position Fisher sensitivity of each (slab, channel) over ``prompts``.

    Args:
        loaded: the model (float32; its parameters are not changed).
        prompts: (context, continuation) token ids; contexts longer than ``skip``,
            continuations of at least 2 tokens.
        draws: sampled target sets per prompt (more: less noise, one backward pass each).
        skip: leading context tokens left out of the average (cachegen's exact tokens).
        seed: of the sampled targets.
        channel_weight: ``alpha`` in ``slab_mean^(1 - alpha) * channel^alpha``: how far each
            channel's own estimate is trusted over its slab's mean (0: one sensitivity per slab,
            1: per channel). Per channel alone zeroes channels whose sensitivity is underestimated
            at coarse steps; 0.5 measured best (docs/codecs.md).
        reference_tokens: the context length the result is scaled to (each prompt's estimate is
            multiplied by its context length over this): per-token sensitivity falls about as
            1 / context length, and ``LEVEL_LAMBDA`` assumes 2048-token contexts.
    Returns:
        ``slabs * channels`` positive float64 values in chunk order (layer, K/V, head, dim).
    Raises:
        InvalidInput: no prompts, a prompt too short, ``draws < 1`` or ``channel_weight`` outside [0, 1].
    """
    if not prompts or draws < 1 or not 0.0 <= channel_weight <= 1.0 or reference_tokens < 1:
        raise InvalidInput("cachegen calibration needs a prompt, a draw, channel_weight in [0, 1]")
    total: torch.Tensor | None = None
    gen = torch.Generator().manual_seed(seed)
    for context, continuation in prompts:
        if len(context) <= skip or len(continuation) < 2:
            raise InvalidInput(f"calibration prompts need > {skip} context and >= 2 continuation tokens")
        fisher = _fisher(loaded, context, continuation, draws, gen)
        per_channel = fisher[:, :, skip:].mean(dim=2).reshape(-1) * (len(context) / reference_tokens)
        total = per_channel if total is None else total + per_channel
    assert total is not None
    fisher = np.maximum((total / len(prompts)).double().numpy(), 1e-30)
    slabs = loaded.spec.num_layers * loaded.spec.kv_factor
    per_slab = fisher.reshape(slabs, -1).mean(axis=1, keepdims=True)
    mixed = per_slab ** (1.0 - channel_weight) * fisher.reshape(slabs, -1) ** channel_weight
    out: F64 = np.maximum(mixed.reshape(-1), 1e-30)
    return out


def rope_theta_of(loaded: LoadedModel) -> float:
    """The model's RoPE base for cachegen's ``rope_theta``: 0.0 unless it is plain (unscaled) RoPE."""
    config = loaded.model.config.get_text_config(decoder=True)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope.get("rope_type", "default") != "default" or not isinstance(theta, (int, float)):
        return 0.0
    return float(theta)


def _fisher(
    loaded: LoadedModel, context: Sequence[int], continuation: Sequence[int], draws: int, gen: torch.Generator
) -> torch.Tensor:
    """``[layers, 2, tokens, heads, dim]`` squared gradients, averaged over draws, per scored position."""
    model = loaded.model
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(context)], device=device), use_cache=True, logits_to_keep=1)
        kv = cache_to_chunk(out.past_key_values, dtype=torch.float32)
    kv = kv.clone().requires_grad_(True)
    inputs = torch.tensor([list(continuation[:-1])], device=device)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        acc = torch.zeros_like(kv)
        for _ in range(draws):
            with torch.enable_grad():
                cache = chunks_to_cache([kv], config=model.config, dtype=torch.float32, device=device)
                logits = model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                targets = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(device)
                (grad,) = torch.autograd.grad(logp.gather(1, targets).sum(), kv)
            acc += grad.detach() ** 2
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return (acc / (draws * inputs.shape[1])).cpu()
