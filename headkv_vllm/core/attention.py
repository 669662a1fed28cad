"""One layer's HeadKV attention over head pages, given the step plan and a page store.

- Prefill (each request prefilled in the step): full causal attention over the
  prompt (prefill itself is not compressed), window scores of the prompt's keys,
  then the store keeps each head's top tokens. A preempted request recomputed
  with its generated tokens: those tokens attend over the compressed prompt.
- Decode: append the token to every head, then attend over the head pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headkv_vllm.core.page_store import PageStore
from headkv_vllm.core.plan import StepPlan
from headkv_vllm.kernels import window_scores as _scores


@dataclass(frozen=True)
class LayerStep:
    """A layer's view of the step: the shared plan, the layer index and the store's
    per-layer state (the attention metadata vLLM hands to the layer)."""

    plan: StepPlan
    layer: int
    store: PageStore
    state: object

    @property
    def num_actual_tokens(self) -> int:
        return self.plan.num_actual_tokens


@dataclass(frozen=True)
class HeadAttention:
    """The per-layer constants of the attention op."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    pool_kernel: int

    def forward(self, step: LayerStep, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                pages: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """query/output ``[T, Hq * d]``, key/value ``[T, Hkv * d]``; pages ``[num_blocks, 2, bs, d]``."""
        d = self.head_size
        q = query.view(-1, self.num_heads, d)
        k = key.view(-1, self.num_kv_heads, d)
        v = value.view(-1, self.num_kv_heads, d)
        out = output.view(-1, self.num_heads, d)
        plan, store, state = step.plan, step.store, step.state
        if plan.prefills:
            # Full causal attention over each prompt (prefill itself is not compressed).
            if plan.prefill_span is not None:
                rows = slice(*plan.prefill_span)
            else:
                rows = plan.prefill_tokens
            out[rows] = store.attend_prompts(q[rows], k[rows], v[rows], plan, self.scale).to(out.dtype)
        for pf in plan.prefills:
            s, n, t, w = pf.start, pf.prompt_len, pf.num_tokens, pf.window
            qr, kr, vr = q[s : s + t], k[s : s + t], v[s : s + t]
            if pf.needs_scores[step.layer]:
                scores = self._window_scores(qr[n - w : n], kr[:n], store.use_triton)
            else:
                scores = torch.zeros(self.num_kv_heads, n - w, dtype=torch.float32, device=q.device)
            store.store_prefill(state, pf, scores, kr, vr, pages)
            if t > n:
                out[s + n : s + t] = store.attend_recomputed(state, pf, qr[n:], pages, self.scale).to(out.dtype)
        if plan.num_decodes:
            rows = slice(*plan.decode_span) if plan.decode_span is not None else plan.decode_tokens
            store.append_decode(state, k[rows], v[rows], pages)
            out[rows] = store.attend_decode(state, q[rows], pages, self.scale).to(out.dtype)
        return output

    def _window_scores(self, q_win: torch.Tensor, k: torch.Tensor, use_triton: bool | None) -> torch.Tensor:
        triton = k.is_cuda if use_triton is None else use_triton
        op = _scores.window_scores_triton if triton else _scores.window_scores_ref
        return op(q_win, k, self.scale, self.pool_kernel)
