"""What the tools share: the machine record, a real `vllm serve` process, the KV-cache methods compared, figures, haystack text and needles."""
