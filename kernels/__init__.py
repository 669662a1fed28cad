"""Triton kernels of HeadKV (installed as ``headkv_vllm.kernels``), each with a
PyTorch reference of the same signature."""
