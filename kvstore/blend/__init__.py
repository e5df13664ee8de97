"""CacheBlend-style reuse of passage KV computed in other contexts.

A RAG passage's KV is computed on its own, stored under the content hash of
its tokens (``kvstore.blend.passages``), and reused wherever the passage
recurs: its keys are re-rotated to the new positions (``kvstore.blend.rope``),
the tokens whose KV deviates most from a fresh computation are found at a
check layer (``kvstore.blend.select``) and only those, plus every uncached
token, are recomputed through the remaining layers (``kvstore.blend.blender``
over ``kvstore.blend.llama``); the tokens not recomputed are moved by their
passage's drift, estimated from the recomputed ones (``kvstore.blend.drift``).
``kvstore.blend.gpu`` loads the CuPy kernels
of ``kernels/blend.cu`` where CuPy and a CUDA device are present.

Importing this package imports nothing heavy; import the submodules.
"""
