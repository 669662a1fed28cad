"""Which prompt tokens each KV head keeps, by the engine's own code, and how much of
the needle's answer that is.

The engine's rule (``core.attention.HeadAttention._prefill`` and the page stores'
``store_prefill``): a prompt of n tokens keeps ``Budgets.kept(n)`` tokens per head,
window included; window scores are ``kernels.window_scores.window_scores_ref`` of the
last ``window`` queries over the prompt's keys; head h keeps its top
``min(kept, n) - window`` prefix positions by ``kernels.select_store.select_sources``
(ties: lower position first), then the window. Both are called here, not copied.

``headkv_vllm/reference.py`` ranks and selects independently (``LlamaReference._rank``
and ``_select``); :class:`ReferenceSelection` feeds it the same queries, keys and
budgets so the two kept sets can be compared.
"""

from __future__ import annotations

import torch

from headkv_vllm.kernels.select_store import select_sources
from headkv_vllm.kernels.window_scores import window_scores_ref
from headkv_vllm.reference import LlamaReference
from headkv_vllm.tools.diagnose.capture_qk import PromptQK


def window_scores(qk: PromptQK, layer: int, end: int, window: int, pool_kernel: int) -> torch.Tensor:
    """[Hkv, end - window]: the engine's scores of a prompt cut at ``end`` (its last ``window`` queries)."""
    return window_scores_ref(qk.window_queries(layer, end - window, end), qk.k[layer][:end], qk.scale, pool_kernel)


def engine_kept(scores: torch.Tensor, kept: tuple[int, ...], window: int, n: int) -> list[torch.Tensor]:
    """Positions each head keeps, ascending. ``scores`` are of a prompt cut at ``end = P + window``;
    positions from ``end`` to ``n`` (the template after a 'user-text' window) are kept on top."""
    end = scores.shape[1] + window
    lengths = torch.tensor([min(k, end) for k in kept], dtype=torch.long)
    src, valid = select_sources(scores, lengths - window, lengths, int(lengths.max()))
    tail = torch.arange(end, n)
    return [torch.cat([src[h][valid[h]].sort().values, tail]) for h in range(len(kept))]


def retention(kept: torch.Tensor, positions: tuple[int, ...]) -> float:
    """Share of ``positions`` in ``kept``."""
    if not positions:
        raise ValueError("no positions to retain: the span is empty.")
    return float(torch.isin(torch.tensor(positions), kept).float().mean())


REFERENCE_NOTE = "headkv_vllm/reference.py: LlamaReference._rank and _select on the captured queries and keys"


class ReferenceSelection:
    """The reference's kept positions; its ranking (independent of budgets) is computed once per setting."""

    def __init__(self, qk: PromptQK):
        self.ref = LlamaReference
        self.qk = qk
        self._orders: dict[tuple, list[list[int]]] = {}

    def _probs(self, layer: int, head: int, end: int, window: int) -> torch.Tensor:
        """[G, end, end] causal attention of the group's query heads; only the window rows are
        filled, the only rows ``_rank`` reads (the rest stays unwritten, so it costs no memory)."""
        k = self.qk.k[layer][:end, head]
        num_kv = self.qk.k[layer].shape[1]
        q = self.qk.window_queries(layer, end - window, end)
        group = q.shape[1] // num_kv
        qh = q[:, head * group : (head + 1) * group]  # [w, G, d]
        logits = torch.einsum("ngd,md->gnm", qh, k) * self.qk.scale
        mask = torch.arange(end)[None, :] <= torch.arange(end - window, end)[:, None]
        probs = torch.empty(group, end, end)
        probs[:, end - window :] = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        return probs

    def orders(self, layer: int, end: int, window: int, pool_kernel: int) -> list[list[int]]:
        key = (layer, end, window, pool_kernel)
        if key not in self._orders:
            heads = self.qk.k[layer].shape[1]
            self._orders[key] = [self.ref._rank(self._probs(layer, h, end, window), window, pool_kernel)
                                 for h in range(heads)]
        return self._orders[key]

    def kept(self, layer: int, end: int, window: int, pool_kernel: int, kept: tuple[int, ...], n: int) -> list[torch.Tensor]:
        positions = torch.arange(end, dtype=torch.float32)[:, None]
        tail = torch.arange(end, n)
        out = []
        for order, keep in zip(self.orders(layer, end, window, pool_kernel), kept):
            chosen, _ = self.ref._select(positions, positions, order, keep, window)
            out.append(torch.cat([chosen[:, 0].long().sort().values, tail]))
        return out
