"""vLLM glue: the plugin, the attention backend, the head-page spec and manager, the
worker; ``vllm_patches`` (what the plugin changes in vLLM) and ``vllm_access`` (the vLLM
internals it reads, and where else it relies on them)."""
