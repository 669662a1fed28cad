"""Causal attention of each prefill over its own prompt (prefill itself is not compressed).

The step's prompts come packed: ``q [M, Hq, d]``, prompt i's queries in rows
``plan.prompts.cu_seqlens_q[i] .. [i + 1]``; ``k``/``v [M_k, Hkv, d]``, its keys in rows
``plan.prompts.cu_seqlens_k[i] .. [i + 1]``. Without chunked prefill the two are equal;
a chunk's keys start with its earlier chunks', so its queries are the last rows of its
keys (causal, aligned at the end). Page
stores pick the implementation: vLLM's variable-length flash attention on CUDA
(``engine.vllm_access.flash_prefill_attention``), vLLM's CPU attention op on the CPU
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
    qs, ks = 0, 0
    for pf in plan.prefills:
        nq, nk = pf.prompt_queries, pf.context + pf.prompt_queries
        if nq == 0:
            continue
        mask = None
        if nk > nq:  # a later chunk: query i is position nk - nq + i
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        out[qs : qs + nq] = F.scaled_dot_product_attention(
            q[qs : qs + nq].transpose(0, 1)[None], k[ks : ks + nk].transpose(0, 1)[None],
            v[ks : ks + nk].transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=True,
        )[0].transpose(0, 1)
        qs, ks = qs + nq, ks + nk
    return out
