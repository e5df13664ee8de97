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

from kvstore.codecs import cachegen_rope as rope
from kvstore.codecs.base import ChunkLayout
from kvstore.codecs.cachegen_params import F64, Geometry
from kvstore.codecs.cachegen_transform import HeadStatistics
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


def calibrate_heads(
    loaded: LoadedModel,
    prompts: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    draws: int = 2,
    skip: int = 1,
    seed: int = 0,
    rope_theta: float = 0.0,
    reference_tokens: int = 2048,
) -> HeadStatistics:
    """Per (slab, KV head): the ``D x D`` Fisher information and the values' covariance.

    The same sampled-target gradients as :func:`calibrate` (whose per-channel numbers are this
    Fisher's diagonal before mixing), but as outer products ``g g^T`` per head and token, averaged
    the same way; the covariance is over each context's tokens (after ``skip``) around its own mean,
    averaged over prompts. With ``rope_theta``, keys and their gradients are un-rotated by their
    positions in the context first (rotations are orthogonal: the Fisher turns with the keys), as
    the codec un-rotates keys within a chunk. :func:`cachegen_transform.build_transform` turns the
    result into a profile's transform.

    Raises:
        InvalidInput: as :func:`calibrate`, or a model whose KV is not ``kv_separate``.
    """
    if not prompts or draws < 1 or reference_tokens < 1 or rope_theta < 0:
        raise InvalidInput("cachegen head calibration needs a prompt, a draw and rope_theta >= 0")
    if loaded.spec.kv_factor != 2:
        raise InvalidInput("cachegen head calibration needs kv_separate KV")
    fisher: torch.Tensor | None = None
    cov: torch.Tensor | None = None
    gen = torch.Generator().manual_seed(seed)
    for context, continuation in prompts:
        if len(context) <= skip or len(continuation) < 2:
            raise InvalidInput(f"calibration prompts need > {skip} context and >= 2 continuation tokens")
        kv, grads = _gradients(loaded, context, continuation, draws, gen)
        g_sum: torch.Tensor | None = None
        for grad in grads:
            g = _unrotated(loaded, grad, rope_theta)[:, :, skip:].double()
            outer = torch.einsum("lkthd,lkthe->lkhde", g, g)
            g_sum = outer if g_sum is None else g_sum + outer
        assert g_sum is not None
        scale = (len(context) / reference_tokens) / (draws * (len(continuation) - 1) * (len(context) - skip))
        fisher = g_sum * scale if fisher is None else fisher + g_sum * scale
        x = _unrotated(loaded, kv, rope_theta)[:, :, skip:].double()
        x = x - x.mean(dim=2, keepdim=True)
        c = torch.einsum("lkthd,lkthe->lkhde", x, x) / x.shape[2]
        cov = c if cov is None else cov + c
    assert fisher is not None and cov is not None
    shape = (-1, *fisher.shape[2:])
    return HeadStatistics(
        (fisher / len(prompts)).reshape(shape).numpy(),
        (cov / len(prompts)).reshape(shape).numpy(),
        rope_theta,
    )


def _unrotated(loaded: LoadedModel, chunk: torch.Tensor, theta: float) -> torch.Tensor:
    """A float32 ``[layers, 2, tokens, heads, dim]`` chunk with its keys un-rotated (``theta`` > 0)."""
    if not theta:
        return chunk
    layout = ChunkLayout(loaded.spec_for("float32"), chunk.shape[2])
    g = Geometry.of(layout, 0)
    raw = chunk.contiguous().numpy().view(np.uint8).reshape(-1)
    out = rope.unrotated(raw, g, theta)
    return torch.from_numpy(out.view(np.float32).reshape(chunk.shape).copy())


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
    _, grads = _gradients(loaded, context, continuation, draws, gen)
    acc = sum((g**2 for g in grads), torch.zeros_like(grads[0]))
    return acc / (draws * (len(continuation) - 1))


def _gradients(
    loaded: LoadedModel, context: Sequence[int], continuation: Sequence[int], draws: int, gen: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the context's float32 KV, one gradient per draw of the sampled targets' log-probability)."""
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
        grads = []
        for _ in range(draws):
            with torch.enable_grad():
                cache = chunks_to_cache([kv], config=model.config, dtype=torch.float32, device=device)
                logits = model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                targets = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(device)
                (grad,) = torch.autograd.grad(logp.gather(1, targets).sum(), kv)
            grads.append(grad.detach().cpu())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return kv.detach().cpu(), grads
