"""The step harness's oracle: each head's kept tokens and attention from first
principles (docs/method.md), using neither the step plan, the kernels' page layout
code nor the kernels."""

from __future__ import annotations

import torch

from headkv_vllm.method.budgets import Budgets
from headkv_vllm.method.layout import page_positions
from support.step_scenario import Shape


class Oracle:
    """Per head a list of kept K/V rows: the top ``kept - window`` prefix positions by
    score (ties: lower position first) in position order, the window, then every later
    token; and plain softmax attention over them."""

    def __init__(self, shape: Shape, budgets: Budgets):
        self.shape, self.budgets = shape, budgets
        self.scale = shape.head_dim ** -0.5
        self.heads: dict[tuple[int, int], list[list[torch.Tensor]]] = {}  # (layer, r) -> [K list, V list]

    def _group(self, h: int) -> slice:
        g = self.shape.num_heads // self.shape.num_kv_heads
        return slice(h * g, (h + 1) * g)

    def needs_scores(self, layer: int, prompt: int) -> bool:
        return any(k < prompt for k in self.budgets.kept(prompt)[layer])

    def kept_positions(self, layer: int, prompt: int, scores: torch.Tensor | None) -> list[torch.Tensor]:
        w = min(self.shape.window, prompt)
        out = []
        for h, kept in enumerate(self.budgets.kept(prompt)[layer]):
            if kept >= prompt:
                out.append(torch.arange(prompt))
                continue
            order = scores[h].sort(descending=True, stable=True).indices[: kept - w]
            out.append(torch.cat([order.sort().values, torch.arange(prompt - w, prompt)]))
        return out

    def prefill(self, layer: int, r: int, q, k, v, prompt: int, scores, rows: torch.Tensor):
        """q [T, Hq, d], k/v [T, Hkv, d] the request's step tokens (prompt, then generated).
        Returns (prompt outputs at ``rows`` [len(rows), Hq, d], generated outputs [g, Hq, d])."""
        prompt_out = torch.empty(len(rows), *q.shape[1:])
        gen_out = torch.empty(q.shape[0] - prompt, *q.shape[1:])
        keep = self.kept_positions(layer, prompt, scores)
        lists = [[], []]
        for h in range(self.shape.num_kv_heads):
            g = self._group(h)
            prompt_out[:, g] = self._causal(q[rows, g], k[:prompt, h], v[:prompt, h], rows)
            K = torch.cat([k[keep[h], h], k[prompt:, h]])
            V = torch.cat([v[keep[h], h], v[prompt:, h]])
            for j in range(gen_out.shape[0]):  # generated token j: the kept prompt and tokens up to itself
                n = len(keep[h]) + j + 1
                gen_out[j, g] = (q[prompt + j, g] @ K[:n].T * self.scale).softmax(-1) @ V[:n]
            lists[0].append(K)
            lists[1].append(V)
        self.heads[(layer, r)] = lists
        return prompt_out, gen_out

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """q [r, G, d] at prompt positions ``rows`` over k/v [P, d]: causal softmax attention."""
        out = torch.empty_like(q)
        for a in range(0, len(rows), 512):  # bounds the [512, G, P] logits
            logits = torch.einsum("rgd,nd->rgn", q[a : a + 512], k) * self.scale
            logits.masked_fill_(torch.arange(k.shape[0])[None, None, :] > rows[a : a + 512, None, None], float("-inf"))
            out[a : a + 512] = torch.einsum("rgn,nd->rgd", logits.softmax(-1), v)
        return out

    def decode(self, layer: int, r: int, q, k, v) -> torch.Tensor:
        """q [Hq, d], k/v [Hkv, d] one token: appended to every head, then attention."""
        keys, values = self.heads[(layer, r)]
        out = torch.empty_like(q)
        for h in range(self.shape.num_kv_heads):
            keys[h] = torch.cat([keys[h], k[h][None]])
            values[h] = torch.cat([values[h], v[h][None]])
            g = self._group(h)
            out[g] = (q[g] @ keys[h].T * self.scale).softmax(-1) @ values[h]
        return out

    def held(self, layer: int, r: int) -> list[list[torch.Tensor]]:
        """[keys per head, values per head] of request ``r`` at ``layer``."""
        return self.heads[(layer, r)]


def head_slots(table_row: torch.Tensor, kept: tuple[int, ...], lengths: list[int], block_size: int):
    """Slots of each head's positions from ``method.layout.page_positions`` (not the kernels' helper)."""
    max_pages = max(1, max(-(-n // block_size) for n in lengths))
    pos = page_positions(torch.tensor([kept], dtype=torch.long), block_size, max_pages)[0]
    out = []
    for h, n in enumerate(lengths):
        p = torch.arange(n)
        out.append(table_row.long()[pos[h, p // block_size]] * block_size + p % block_size)
    return out


def prompt_rows(prompt: int, window: int, limit: int | None) -> torch.Tensor:
    """The prompt rows the oracle recomputes: all, or ``limit`` of them spread over the
    prompt, the window's included."""
    if limit is None or prompt <= limit:
        return torch.arange(prompt)
    spread = torch.linspace(0, prompt - 1, limit - window).round().long()
    return torch.unique(torch.cat([spread, torch.arange(prompt - window, prompt)]))
