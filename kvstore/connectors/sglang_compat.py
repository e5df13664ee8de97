"""SGLang's HiCache storage classes: the real ones when SGLang is installed.

``HAVE_SGLANG`` tells which were found. Type checkers always see the local
stand-ins of :mod:`kvstore.connectors.sglang_base` (same names and
signatures as the pinned release, SGLang 0.5.23).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

PINNED_SGLANG = "0.5.23"

if TYPE_CHECKING:
    from kvstore.connectors.sglang_base import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

    HAVE_SGLANG: bool
else:
    try:
        from sglang.srt.mem_cache.hicache_storage import (
            HiCacheStorage,
            HiCacheStorageConfig,
            HiCacheStorageExtraInfo,
        )

        HAVE_SGLANG = True
    except ImportError:
        from kvstore.connectors.sglang_base import (
            HiCacheStorage,
            HiCacheStorageConfig,
            HiCacheStorageExtraInfo,
        )

        HAVE_SGLANG = False

__all__ = ["HAVE_SGLANG", "PINNED_SGLANG", "HiCacheStorage", "HiCacheStorageConfig", "HiCacheStorageExtraInfo"]
