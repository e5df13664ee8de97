"""Engine connectors: adapters between inference engines and kvstore.

- ``hf``: prefix reuse for a HuggingFace transformers causal LM (prefill only what is
  not cached; store new chunks, decode-phase KV included, in the background);
- ``vllm``: kvstore as a vLLM v1 KV connector (``kv_connector_module_path``);
- ``sglang``: kvstore as an SGLang HiCache storage backend;
- ``paged``: gather (pages -> chunk) and scatter (chunk -> pages) between an
  engine's paged KV cache -- vLLM FlashAttention and FlashInfer (NHD, HND),
  MLA latent pages, SGLang HiCache host pools -- and kvstore's chunk layout,
  with torch on any device or the CUDA kernels of ``kernels/paged.cu``
  (CuPy, optional). See docs/paged.md.

Importing this package imports nothing heavy; import the submodules you use.
"""
