"""One layer's HeadKV attention over head pages, given the step plan and a page store.

- Prefill (each request prefilled in the step): full causal attention over the
  prompt (prefill itself is not compressed), window scores of the prompt's keys,
  then the store keeps each head's top tokens. A preempted request recomputed
  with its generated tokens: those tokens attend over the compressed prompt.
- Chunked prefill: a prompt chunk writes its tokens uncompressed (``core.chunks``)
  and attends over the earlier chunks; the last chunk reads them back, scores the
  whole prompt (window queries of earlier chunks were saved) and stores the kept
  tokens compressed, as a whole-prompt prefill would.
- Decode: append the token to every head, then attend over the head pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headkv_vllm.core.chunks import read_uncompressed, write_uncompressed
from headkv_vllm.core.page_store import KernelOps, PageStore
from headkv_vllm.core.plan import PrefillPlan, StepPlan


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
            # Earlier chunks' tokens of prompts continued in this step (uncompressed pages).
            context = {pf.row: read_uncompressed(pages, state.rows[pf.row], pf.context, self.num_kv_heads)
                       for pf in plan.prefills if pf.context > 0 and pf.prompt_queries > 0}
            prompts = plan.prompts
            if prompts.tokens.numel():
                # Full causal attention over each prompt (prefill itself is not compressed).
                rows = slice(*prompts.span) if prompts.span is not None else prompts.tokens
                pk, pv = (k[rows], v[rows]) if not prompts.has_context else self._with_context(plan, context, k, v)
                out[rows] = store.attend_prompts(q[rows], pk, pv, plan, self.scale).to(out.dtype)
            for pf in plan.prefills:
                self._prefill(step, pf, q, k, v, pages, out, context.get(pf.row))
        if plan.num_decodes:
            rows = slice(*plan.decode.span) if plan.decode.span is not None else plan.decode.tokens
            store.append_decode(state, k[rows], v[rows], pages)
            out[rows] = store.attend_decode(state, q[rows], pages, self.scale).to(out.dtype)
        return output

    def _prefill(self, step: LayerStep, pf: PrefillPlan, q, k, v, pages, out, context) -> None:
        """Everything but prompt attention for one prefilling request (its kind: PrefillPlan)."""
        store, state, layer = step.store, step.state, step.layer
        s, c, n = pf.start, pf.computed, pf.prompt_len
        e = s + pf.num_tokens - c  # the request's step rows are [s, e)
        if pf.num_tokens < n:  # a prompt chunk: stays uncompressed until the last chunk
            write_uncompressed(pages, state.rows[pf.row], c, k[s:e], v[s:e])
            first_window = n - pf.window
            if pf.num_tokens > first_window and pf.needs_scores[layer]:
                a = max(c, first_window)
                step.plan.window_stash.save(pf.key, layer, q[s + a - c : e], first=c <= first_window)
            return
        if pf.compresses:
            kr, vr = k[s:e], v[s:e]
            if context is not None:
                kr, vr = torch.cat([context[0], kr]), torch.cat([context[1], vr])  # positions 0 .. num_tokens-1
            if pf.needs_scores[layer]:
                q_win = q[s + max(0, n - pf.window - c) : s + n - c]
                if pf.saved_window:
                    q_win = torch.cat([step.plan.window_stash.take(pf.key, layer, pf.saved_window), q_win])
                scores = self._window_scores(q_win, kr[:n], store.ops)
            else:
                scores = torch.zeros(self.num_kv_heads, n - pf.window, dtype=torch.float32, device=q.device)
            store.store_prefill(state, pf, scores, kr, vr, pages)
        else:  # generated tokens of a recomputed request, after its compressed prompt
            store.append_tokens(state, pf, k[s:e], v[s:e], pages)
        if pf.new_generated:
            g = e - pf.new_generated
            out[g:e] = store.attend_recomputed(state, pf, q[g:e], pages, self.scale).to(out.dtype)

    @staticmethod
    def _with_context(plan: StepPlan, context: dict, k: torch.Tensor, v: torch.Tensor):
        """The packed keys/values of prompt attention: per prefill its earlier chunks, then its step rows."""
        ks, vs = [], []
        for pf in plan.prefills:
            if pf.prompt_queries == 0:
                continue
            rows = slice(pf.start, pf.start + pf.prompt_queries)
            if pf.row in context:
                ks.append(context[pf.row][0])
                vs.append(context[pf.row][1])
            ks.append(k[rows])
            vs.append(v[rows])
        return torch.cat(ks), torch.cat(vs)

    def _window_scores(self, q_win: torch.Tensor, k: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        return ops.window_scores(q_win, k, self.scale, self.pool_kernel)
