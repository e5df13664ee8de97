"""Row copies with torch (and numpy on the CPU): the path every machine has.

A transfer is one indexed copy per layer over a precomputed row index
(:meth:`RowMap.rows`), never a Python loop over tokens. Rows are moved as
opaque words (int64/int32/int16/uint8, or numpy void items of a whole row),
so every bit pattern -- NaN payloads, fp8 -- arrives unchanged.

- gather: ``torch.index_select(pages_as_rows, 0, rows, out=chunk_rows)``
  (one ``memcpy`` per row on the CPU);
- scatter on the CPU: numpy fancy assignment of whole-row void items
  (``pages[rows] = chunk``), which copies row by row; torch's ``index_copy_``
  and ``index_put_`` walk the rows element by element on the CPU and were
  2-3x slower here;
- scatter on another device: ``index_copy_``.

Copying whole blocks as single rows where the layout allows (NHD) was tried
and measured no faster here: on the CPU the cost is reading pages from
scattered blocks, not the number of rows.
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


def _chunk_rows(chunk: torch.Tensor, run: int) -> torch.Tensor:
    """``[n, rows, run]`` view of a contiguous ``[n, ...]`` chunk (rows in chunk order)."""
    return chunk.view(chunk.shape[0], -1, run)


def _word(rm: RowMap, itemsize: int, views: list[torch.Tensor]) -> torch.dtype:
    """The widest integer dtype every row and every view's start is a whole number of."""
    return _WORDS[
        word_size([rm.run * itemsize, *(int(v.storage_offset()) * itemsize for v in views)], limit=8)
    ]


def _void(rows: torch.Tensor) -> np.ndarray:
    """A ``[n, width]`` CPU tensor as a 1-D numpy array of whole-row void items (a view)."""
    as_bytes = rows.view(torch.uint8).numpy()
    return as_bytes.view(np.dtype((np.void, as_bytes.shape[1])))[:, 0]


class TorchMover(PagedMover):
    """Row copies with ``index_select`` (gather) and numpy / ``index_copy_`` (scatter), one per layer."""

    def gather(self, cache: PagedKVCache, slots: torch.Tensor, first: int, out: torch.Tensor) -> None:
        rm = cache.rowmap
        rows = rm.rows(slots.to(cache.device))
        views = cache.row_views[first : first + out.shape[0]]
        word = _word(rm, cache.dtype.itemsize, [out, *views])
        for view, dst in zip(views, _chunk_rows(out, rm.run)):
            torch.index_select(view.view(word), 0, rows, out=dst.view(word))

    def scatter(self, cache: PagedKVCache, slots: torch.Tensor, first: int, chunk: torch.Tensor) -> None:
        rm = cache.rowmap
        views = cache.row_views[first : first + chunk.shape[0]]
        if cache.device.type == "cpu":
            rows_np = rm.rows(slots).numpy()
            for view, src in zip(views, _chunk_rows(chunk, rm.run)):
                _void(view)[rows_np] = _void(src)
            return
        rows = rm.rows(slots.to(cache.device))
        word = _word(rm, cache.dtype.itemsize, [chunk, *views])
        for view, src in zip(views, _chunk_rows(chunk, rm.run)):
            view.view(word).index_copy_(0, rows, src.view(word))
