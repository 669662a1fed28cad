"""An independent HeadKV reference: the tests' oracle for the engine, and the
cross-check of ``headkv-vllm diagnose-needle``. It imports torch and safetensors only,
nothing of this package, so that it stays independent of the code it checks.

Plain PyTorch, batch size 1, float32: a Llama forward written from the weights
(no vLLM, no transformers modelling code), full causal prefill, then per layer and
KV head SnapKV-style selection of the prompt's kept tokens (docs/method.md
s.3), then greedy decoding where every head attends over its own kept list.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class LlamaReference:
    def __init__(self, model_dir: Path):
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.w = load_file(str(Path(model_dir) / "model.safetensors"))
        self.L = cfg["num_hidden_layers"]
        self.Hq = cfg["num_attention_heads"]
        self.Hkv = cfg["num_key_value_heads"]
        self.d = cfg.get("head_dim") or cfg["hidden_size"] // self.Hq
        self.eps = cfg["rms_norm_eps"]
        theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d)
        self.embed = self.w["model.embed_tokens.weight"]
        self.lm_head = self.w.get("lm_head.weight", self.embed)
        self._prefills: dict = {}

    def _norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x, positions):  # x: [n, heads, d]
        angles = positions[:, None].double() * self.inv_freq[None, :]
        cos = torch.cat([angles.cos(), angles.cos()], -1).float()[:, None, :]
        sin = torch.cat([angles.sin(), angles.sin()], -1).float()[:, None, :]
        half = self.d // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def _qkv(self, layer, x, positions):
        p = f"model.layers.{layer}."
        h = self._norm(x, self.w[p + "input_layernorm.weight"])
        q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(-1, self.Hq, self.d)
        k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(-1, self.Hkv, self.d)
        v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(-1, self.Hkv, self.d)
        return self._rope(q, positions), self._rope(k, positions), v

    def _finish_layer(self, layer, x, attn):
        p = f"model.layers.{layer}."
        x = x + attn.reshape(x.shape[0], -1) @ self.w[p + "self_attn.o_proj.weight"].T
        h = self._norm(x, self.w[p + "post_attention_layernorm.weight"])
        gate = h @ self.w[p + "mlp.gate_proj.weight"].T
        up = h @ self.w[p + "mlp.up_proj.weight"].T
        return x + (F.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T

    def _logits(self, x):
        return self._norm(x, self.w["model.norm.weight"]) @ self.lm_head.T

    @torch.no_grad()
    def _prefill(self, prompt: tuple[int, ...], window: int, pool_kernel: int):
        """Full causal prefill: per layer and KV head the prompt's K, V and the prefix
        positions ranked by pooled window score; the last position's hidden state.
        Independent of the budgets, so it is computed once per prompt."""
        key = (prompt, window, pool_kernel)
        if key in self._prefills:
            return self._prefills[key]
        n = len(prompt)
        scale = self.d ** -0.5
        group = self.Hq // self.Hkv
        x = self.embed[torch.tensor(prompt)]
        pos = torch.arange(n)
        ranked = []  # ranked[l][h] = (K [n, d], V [n, d], prefix positions best first)
        for layer in range(self.L):
            q, k, v = self._qkv(layer, x, pos)
            heads, attn = [], torch.empty_like(q)
            for h in range(self.Hkv):
                qh = q[:, h * group : (h + 1) * group]  # [n, G, d]
                logits = torch.einsum("ngd,md->gnm", qh, k[:, h]) * scale
                mask = torch.ones(n, n, dtype=torch.bool).tril()
                probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
                attn[:, h * group : (h + 1) * group] = torch.einsum("gnm,md->ngd", probs, v[:, h])
                heads.append((k[:, h].clone(), v[:, h].clone(), self._rank(probs, window, pool_kernel)))
            ranked.append(heads)
            x = self._finish_layer(layer, x, attn)
        self._prefills[key] = ranked, x[-1:].clone()
        return self._prefills[key]

    @torch.no_grad()
    def generate(self, prompt: list[int], kept: list[list[int]], window: int, pool_kernel: int, steps: int):
        """Greedy tokens and per-step log-softmax rows, with head (l, h) keeping
        ``kept[l][h]`` prompt tokens (window included)."""
        n = len(prompt)
        scale = self.d ** -0.5
        group = self.Hq // self.Hkv
        ranked, x = self._prefill(tuple(prompt), window, pool_kernel)
        cache = [[self._select(*ranked[l][h], kept[l][h], window) for h in range(self.Hkv)] for l in range(self.L)]
        logits = self._logits(x[-1:])[0]
        tokens, logprobs = [], []
        for step in range(steps):
            logprobs.append(logits.log_softmax(-1))
            token = int(logits.argmax())
            tokens.append(token)
            if step == steps - 1:
                break
            x = self.embed[torch.tensor([token])]
            p = torch.tensor([n + step])
            for layer in range(self.L):
                q, k, v = self._qkv(layer, x, p)
                attn = torch.empty_like(q)
                for h in range(self.Hkv):
                    K, V = cache[layer][h]
                    K, V = torch.cat([K, k[:, h]]), torch.cat([V, v[:, h]])
                    cache[layer][h] = (K, V)
                    qh = q[0, h * group : (h + 1) * group]  # [G, d]
                    attn[0, h * group : (h + 1) * group] = ((qh @ K.T) * scale).softmax(-1) @ V
                x = self._finish_layer(layer, x, attn)
            logits = self._logits(x)[0]
        return tokens, torch.stack(logprobs)

    @staticmethod
    def _rank(probs, window, pool_kernel) -> list[int]:
        """probs: [G, n, n] causal attention of the group's query heads."""
        n = probs.shape[-1]
        w = min(window, n)
        score = probs[:, n - w :, : n - w].mean(dim=(0, 1))  # window rows, prefix columns
        if n - w == 0:
            return []
        pooled = F.max_pool1d(score[None, None], pool_kernel, stride=1, padding=pool_kernel // 2)[0, 0]
        return sorted(range(n - w), key=lambda i: (-float(pooled[i]), i))  # ties: lower position first

    @staticmethod
    def _select(k, v, order, keep, window):
        n = k.shape[0]
        if keep >= n:
            return k.clone(), v.clone()
        w = min(window, n)
        top = torch.tensor(sorted(order[: keep - w]), dtype=torch.long)
        idx = torch.cat([top, torch.arange(n - w, n)])
        return k[idx].clone(), v[idx].clone()
