"""The vLLM base classes the adapter subclasses: the real ones when vLLM is installed.

``HAVE_VLLM`` tells which were found. Type checkers always see the local
stand-ins of :mod:`kvstore.connectors.vllm_base`, which share their names and
signatures with the pinned release (vLLM 0.33.0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

PINNED_VLLM = "0.33.0"

if TYPE_CHECKING:
    from kvstore.connectors.vllm_base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

    HAVE_VLLM: bool
else:
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorBase_V1,
            KVConnectorMetadata,
            KVConnectorRole,
        )

        HAVE_VLLM = True
    except ImportError:
        from kvstore.connectors.vllm_base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

        HAVE_VLLM = False

__all__ = ["HAVE_VLLM", "PINNED_VLLM", "KVConnectorBase_V1", "KVConnectorMetadata", "KVConnectorRole"]
