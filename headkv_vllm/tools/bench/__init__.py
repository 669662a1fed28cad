"""`bench`: serving throughput, latency and memory of HEADKV against stock vLLM in one run."""
