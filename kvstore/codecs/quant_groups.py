"""Quantization groups: which elements of a chunk share one scale (and zero point).

Groups never cross layers, so a chunk is quantized (and stored) layer by
layer. One layer is seen as *parts* of shape ``[tokens, channels]``: K and V
of ``kv_separate`` (channels = kv_heads * head_dim, so a group may span
heads), or the one MLA latent (channels = its dim). A *segment* is a slice
of one part cut into equal groups:

- ``token``: groups of ``group_size`` consecutive channels of one token;
- ``channel``: groups of ``group_size`` consecutive tokens of one channel;
- ``tensor``: the whole part (of one layer) is one group.

When ``group_size`` does not divide the axis, the remainder is its own
segment with one smaller group per row. Invariants: the segments of a layer
cover each of its elements exactly once; encoder and decoder derive the same
segments from (layout, params) alone, in the same order. Storage order is
layer by layer, then segment by segment: a segment's codes in the C order of
its slice, its scales in the C order of its groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from kvstore.codecs.base import ChunkLayout

Axis = Literal["token", "channel", "tensor"]
Group = Literal["token", "channel", "kivi", "tensor"]
Array = npt.NDArray[np.generic]


@dataclass(frozen=True, slots=True)
class Segment:
    """Groups of ``size`` elements along ``axis`` in ``part[start:stop]`` or ``part[:, start:stop]``.

    ``part`` is one layer's ``[tokens, channels]`` K, V or latent. Invariants:
    ``size`` divides ``stop - start``; a ``tensor`` segment spans the whole part.
    """

    part: int
    axis: Axis
    start: int
    stop: int
    size: int
    tokens: int
    channels: int

    @property
    def numel(self) -> int:
        if self.axis == "token":
            return self.tokens * (self.stop - self.start)
        if self.axis == "channel":
            return (self.stop - self.start) * self.channels
        return self.tokens * self.channels

    @property
    def num_groups(self) -> int:
        return self.numel // self.size

    @property
    def grouped_shape(self) -> tuple[int, ...]:
        """3-D shape whose dimension :attr:`reduce_dim` runs over one group."""
        width = self.stop - self.start
        if self.axis == "token":
            return (self.tokens, width // self.size, self.size)
        if self.axis == "channel":
            return (width // self.size, self.size, self.channels)
        return (1, self.tokens * self.channels, 1)

    @property
    def reduce_dim(self) -> int:
        return 2 if self.axis == "token" else 1

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """Shape of the per-group scales: :attr:`grouped_shape` with the reduce dimension 1."""
        shape = list(self.grouped_shape)
        shape[self.reduce_dim] = 1
        return tuple(shape)

    def slice(self, part: Array) -> Array:
        """This segment's elements of ``part`` (``[tokens, channels]``), a view."""
        if self.axis == "token":
            return part[:, self.start : self.stop]
        if self.axis == "channel":
            return part[self.start : self.stop]
        return part

    def grouped(self, part: Array) -> Array:
        """This segment's elements of ``part`` in :attr:`grouped_shape` (a copy only if needed)."""
        return self.slice(part).reshape(self.grouped_shape)


def layer_numel(layout: ChunkLayout) -> int:
    """Elements of one layer of a chunk."""
    return layout.nbytes // layout.spec.itemsize // layout.spec.num_layers


def part_views(layer: Array, layout: ChunkLayout) -> list[Array]:
    """One layer's ``[tokens, channels]`` parts (views of a flat array of :func:`layer_numel` values)."""
    spec = layout.spec
    if spec.layout == "mla_latent":
        return [layer.reshape(layout.num_tokens, spec.head_dim)]
    both = layer.reshape(2, layout.num_tokens, spec.num_kv_heads * spec.head_dim)
    return [both[0], both[1]]


def _axis_of(group: Group, part: int, layout: ChunkLayout) -> Axis:
    if group != "kivi":
        return group
    # KIVI: keys per channel (outlier channels), values per token; an MLA latent
    # feeds the keys, so it is quantized per channel too
    if layout.spec.layout == "mla_latent" or part == 0:
        return "channel"
    return "token"


def plan(layout: ChunkLayout, group: Group, group_size: int) -> list[Segment]:
    """The segments of one layer, in storage order (part by part, main groups then remainder)."""
    spec = layout.spec
    tokens = layout.num_tokens
    channels = spec.head_dim if spec.layout == "mla_latent" else spec.num_kv_heads * spec.head_dim
    segments: list[Segment] = []
    for part in range(spec.kv_factor):
        axis = _axis_of(group, part, layout)
        if axis == "tensor":
            segments.append(Segment(part, axis, 0, 0, tokens * channels, tokens, channels))
            continue
        length = channels if axis == "token" else tokens
        size = min(group_size, length)
        main = length - length % size
        segments.append(Segment(part, axis, 0, main, size, tokens, channels))
        if main < length:
            segments.append(Segment(part, axis, main, length, length - main, tokens, channels))
    return segments
