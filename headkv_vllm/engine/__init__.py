"""vLLM glue: the plugin, the attention backend, the head-page spec and manager, the
worker, and ``compat`` (the one module that touches vLLM internals)."""
