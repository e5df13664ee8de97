"""Row copies with torch (any device) and numpy (the CPU): the path every machine has.

A transfer is one indexed copy per layer over a precomputed row index
(:meth:`RowMap.rows`), never a Python loop over tokens. Rows are moved as
opaque items (numpy void items of whole rows on the CPU, integer words
elsewhere), so every bit pattern -- NaN payloads, fp8 -- arrives unchanged.

On the CPU:

- runs of consecutive rows are coalesced first (:func:`coalesce`): when every
  run of rows that is contiguous both in the pages and in the chunk is a whole
  number of aligned groups of ``g`` rows (a block-aligned token range of an NHD
  or MLA cache: ``g`` is the block size), a group is copied as one item, so a
  2048-token transfer from blocks of 16 is 256 copies of 6 KB per layer, not
  4096 of 384 bytes;
- gather is ``numpy.take(pages, items, out=chunk, mode="clip")`` straight into
  the chunk (``mode="clip"`` because the slots are already checked: the default
  mode buffers ``out``), scatter ``pages[items] = chunk``;
- numpy copies on the calling thread. torch's ``index_select`` splits the
  rows over its intra-op threads, and on a small, loaded machine the
  threads' barrier made it up to 30x slower than one thread (measured: a
  2048-token gather took 407 ms on 2 threads against 14 ms on one).

On another device: ``index_select`` (gather) and ``index_copy_`` (scatter)
over integer words as wide as the rows and offsets allow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from kvstore.connectors.paged_cache import PagedKVCache, RowMap, word_size

_WORDS: dict[int, torch.dtype] = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


class PagedMover(ABC):
    """Copies the rows of some tokens between a cache's pages and a chunk.

    ``out`` / ``chunk`` hold layers ``first .. first + n - 1`` as
    ``[n, *layer_chunk_shape]``, contiguous, already checked against the
    cache; ``slots`` is a checked int64 CPU tensor (no repeats for scatter).
    """

    @abstractmethod
    def gather(self, cache: PagedKVCache, slots: torch.Tensor, first: int, out: torch.Tensor) -> None:
        """Copy the tokens at ``slots`` of layers ``first ..`` into ``out``."""

    @abstractmethod
    def scatter(self, cache: PagedKVCache, slots: torch.Tensor, first: int, chunk: torch.Tensor) -> None:
        """Copy ``chunk`` into the tokens at ``slots`` of layers ``first ..``."""


def coalesce(rows: np.ndarray) -> tuple[int, np.ndarray]:
    """Group a row index into aligned runs: ``(g, items)`` with ``rows[i] == items[i // g] * g + i % g``.

    ``g`` is the largest group size for which every run of consecutive rows
    is made of whole groups starting at multiples of ``g`` (1 when there is no
    such group); ``items`` indexes the pages seen as items of ``g`` rows, in
    chunk order.
    """
    n = rows.size
    if n < 2:
        return 1, rows
    starts = np.flatnonzero(np.diff(rows) != 1) + 1
    bounds = np.concatenate(([0], starts, [n]))
    group = int(np.gcd.reduce(np.concatenate((np.diff(bounds), rows[bounds[:-1]]))))
    if group <= 1:
        return 1, rows
    return group, rows[::group] // group


def _items(as_bytes: np.ndarray, group: int) -> np.ndarray:
    """A ``[rows, width]`` C-contiguous byte array as a 1-D array of void items of ``group`` rows (a view)."""
    count = as_bytes.shape[0] // group
    width = group * as_bytes.shape[1]
    flat = as_bytes[: count * group].reshape(count, width)
    return flat.view(np.dtype((np.void, width)))[:, 0]


def _bytes(rows: torch.Tensor) -> np.ndarray:
    """A ``[n, run]`` CPU tensor of rows as a ``[n, run * itemsize]`` numpy byte array (a view)."""
    return rows.detach().view(torch.uint8).numpy()


def _chunk_rows(chunk: torch.Tensor, run: int) -> torch.Tensor:
    """``[n, rows, run]`` view of a contiguous ``[n, ...]`` chunk (rows in chunk order)."""
    return chunk.view(chunk.shape[0], -1, run)


def _word(rm: RowMap, itemsize: int, views: list[torch.Tensor]) -> torch.dtype:
    """The widest integer dtype every row and every view's start is a whole number of."""
    return _WORDS[
        word_size([rm.run * itemsize, *(int(v.storage_offset()) * itemsize for v in views)], limit=8)
    ]


class TorchMover(PagedMover):
    """Coalesced numpy item copies on the CPU; ``index_select`` / ``index_copy_`` elsewhere. One copy per layer."""

    def gather(self, cache: PagedKVCache, slots: torch.Tensor, first: int, out: torch.Tensor) -> None:
        rm = cache.rowmap
        views = cache.row_views[first : first + out.shape[0]]
        if slots.numel() == 0:
            return
        if cache.device.type == "cpu":
            group, items = coalesce(rm.rows(slots).numpy())
            for view, dst in zip(views, _chunk_rows(out, rm.run)):
                np.take(_items(_bytes(view), group), items, out=_items(_bytes(dst), group), mode="clip")
            return
        rows = rm.rows(slots.to(cache.device))
        word = _word(rm, cache.dtype.itemsize, [out, *views])
        for view, dst in zip(views, _chunk_rows(out, rm.run)):
            torch.index_select(view.view(word), 0, rows, out=dst.view(word))

    def scatter(self, cache: PagedKVCache, slots: torch.Tensor, first: int, chunk: torch.Tensor) -> None:
        rm = cache.rowmap
        views = cache.row_views[first : first + chunk.shape[0]]
        if slots.numel() == 0:
            return
        if cache.device.type == "cpu":
            group, items = coalesce(rm.rows(slots).numpy())
            for view, src in zip(views, _chunk_rows(chunk, rm.run)):
                _items(_bytes(view), group)[items] = _items(_bytes(src), group)
            return
        rows = rm.rows(slots.to(cache.device))
        word = _word(rm, cache.dtype.itemsize, [chunk, *views])
        for view, src in zip(views, _chunk_rows(chunk, rm.run)):
            view.view(word).index_copy_(0, rows, src.view(word))
