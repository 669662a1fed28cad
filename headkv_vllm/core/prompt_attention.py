"""Causal attention of each prefill over its own prompt (prefill itself is not compressed).

The step's prompts come packed: ``q [M, Hq, d]``, ``k``/``v [M, Hkv, d]``, prompt i in
rows ``plan.prefill_cu_seqlens[i] .. [i + 1]`` (M = the sum of prompt lengths). Page
stores pick the implementation: vLLM's variable-length flash attention on CUDA
(``engine.compat.flash_prefill_attention``), vLLM's CPU attention op on the CPU
(``engine.cpu_page_store``), ``sdpa_prefill`` otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from headkv_vllm.core.plan import StepPlan

# (q, k, v, plan, scale) -> [M, Hq, d]
PromptAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, StepPlan, float], torch.Tensor]


def sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, scale: float) -> torch.Tensor:
    """One SDPA call per prompt."""
    out = torch.empty_like(q)
    start = 0
    for pf in plan.prefills:
        end = start + pf.prompt_len
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None], v[start:end].transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=True,
        )[0].transpose(0, 1)
        start = end
    return out
