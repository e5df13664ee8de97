"""Real models for tests, codecs, connectors and blending: loading and KV layout helpers.

``kvstore.models.smollm2`` finds, converts (once) and loads SmolLM2-135M-Instruct
offline; ``kvstore.models.kv`` moves KV between transformers caches and
kvstore's chunk layout; ``kvstore.models.prompts`` yields real prompts.
Importing this package does not import transformers.
"""

from kvstore.models.kv import (
    append_chunk,
    cache_num_tokens,
    cache_to_chunk,
    cache_to_chunks,
    check_chunk,
    chunk_to_layers,
    chunks_to_cache,
    spec_from_config,
    torch_dtype,
)
from kvstore.models.smollm2 import (
    MODEL_NAME,
    LoadedModel,
    ModelNotInstalled,
    cache_dir,
    ensure_converted,
    gguf_path,
    load_smollm2,
    model_installed,
    torch_threads,
)

__all__ = [
    "MODEL_NAME",
    "LoadedModel",
    "ModelNotInstalled",
    "append_chunk",
    "cache_dir",
    "cache_num_tokens",
    "cache_to_chunk",
    "cache_to_chunks",
    "check_chunk",
    "chunk_to_layers",
    "chunks_to_cache",
    "ensure_converted",
    "gguf_path",
    "load_smollm2",
    "model_installed",
    "spec_from_config",
    "torch_dtype",
    "torch_threads",
]
