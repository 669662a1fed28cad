"""The compute core: the step plan and attention over head pages. Imports torch, the
kernels and ``headkv_vllm.method`` only (never vLLM), so it runs and is tested alone."""
