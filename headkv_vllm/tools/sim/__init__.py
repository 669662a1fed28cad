"""`sched-sim`: vLLM's scheduler with stock blocks and with head pages at GPU pool sizes, on the CPU."""
