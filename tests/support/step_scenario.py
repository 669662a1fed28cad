"""The scenarios of tests/gpu/test_step_harness.py: requests that arrive, are prefilled
(some recomputed after a preemption) and decode, with block tables filled as vLLM's
scheduler fills them, over the shapes the harness runs (tiny on the CPU, small and
Llama-3-8B's attention on CUDA)."""

from __future__ import annotations

import dataclasses
import random

import torch

from headkv_vllm.core.plan import StepInputs
from headkv_vllm.method.budgets import Budgets, policy_budgets
from headkv_vllm.method.config import HeadKVConfig


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    requests: tuple[tuple[int, int, int], ...]  # (prompt, generated before a preemption, arrival step)
    steps: int
    kv_size: int
    window: int
    pool_kernel: int
    oracle_prompt_rows: int | None = None  # prompt rows per prompt the oracle recomputes (None: all)


# Rows: step 1 has decodes in rows 0, 2, 4, 5, a new prefill (row 1) and a recomputed
# request (row 3); a prompt shorter than the window or than every head's budget keeps
# everything (no scores).
SHAPES = {
    "tiny": Shape("tiny", layers=2, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8,
                  requests=((40, 0, 0), (19, 0, 1), (70, 0, 0), (30, 2, 1), (5, 0, 0), (3, 0, 0)),
                  steps=3, kv_size=16, window=4, pool_kernel=3),
    "small": Shape("small", layers=3, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
                   requests=((120, 0, 0), (37, 0, 1), (300, 0, 0), (50, 3, 1), (6, 0, 0), (90, 0, 0)),
                   steps=4, kv_size=40, window=8, pool_kernel=7),
    # Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens.
    "llama": Shape("llama", layers=4, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                   requests=((4096, 0, 0), (1024, 0, 1), (2500, 0, 0), (1800, 6, 1), (7, 0, 0), (3000, 0, 0)),
                   steps=4, kv_size=512, window=8, pool_kernel=7, oracle_prompt_rows=256),
}
FULL_SHAPES = ("small", "llama")  # what CUDA runs by default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def step_cases(choice: str, device: torch.device) -> list[tuple[str, str]]:
    """(shape, dtype) names for ``--gpu-shapes``: ``auto`` (``full`` on CUDA, ``tiny``
    elsewhere), ``tiny``, ``full`` or shape names, comma-separated. Dtypes: bf16, fp32 and
    fp16 on CUDA; fp32 and bf16 on the CPU (Triton's interpreter is slow)."""
    if choice == "auto":
        choice = "full" if device.type == "cuda" else "tiny"
    names = list(FULL_SHAPES) if choice == "full" else choice.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"--gpu-shapes: unknown shape {unknown[0]!r}; use auto, full or some of {', '.join(SHAPES)}")
    dtypes = ("bfloat16", "float32", "float16") if device.type == "cuda" else ("float32", "bfloat16")
    return [(name, dtype) for name in names for dtype in dtypes]


def make_budgets(shape: Shape, seed: int) -> Budgets:
    """HeadKV budgets from random, strongly skewed head scores (half the heads 0, a heavy
    tail): per layer, heads keep from a few tokens to more than the prompt."""
    rng = random.Random(seed)
    scores = [[rng.paretovariate(1.2) if rng.random() < 0.5 else 0.0 for _ in range(shape.num_kv_heads)]
              for _ in range(shape.layers)]
    config = HeadKVConfig(kv_size=shape.kv_size, policy="headkv", window=shape.window, pool_kernel=shape.pool_kernel)
    return policy_budgets(config, shape.layers, shape.num_kv_heads, scores)


@dataclasses.dataclass(frozen=True)
class Prefill:
    """A request prefilled in the step: step rows ``[start, start + prompt + generated)``."""

    start: int
    prompt: int
    generated: int  # tokens it had generated before a preemption, recomputed after the prompt


@dataclasses.dataclass(frozen=True)
class Decode:
    row: int  # the step row of its one token


class Scenario:
    """Requests prefilled at their arrival step (prompt + tokens generated before a
    preemption), then decoded one token a step. Block-table rows are filled as a
    scheduler would: the pages in use are a prefix of the canonical order, each a
    random free page id of one pool shared by all layers."""

    def __init__(self, shape: Shape, budgets: Budgets, seed: int):
        self.shape, self.budgets = shape, budgets
        self.gen = torch.Generator().manual_seed(seed)
        final = [self._pages(layer, r, prompt + gen + max(0, shape.steps - 1 - arrives))
                 for layer in range(shape.layers) for r, (prompt, gen, arrives) in enumerate(shape.requests)
                 if arrives < shape.steps]
        self.num_blocks = 1 + sum(final) + 8  # block 0 is the null block
        self.free = (torch.randperm(self.num_blocks - 1, generator=self.gen) + 1).tolist()
        width = max(final) + 2
        self.tables = [torch.zeros(len(shape.requests), width, dtype=torch.int32) for _ in range(shape.layers)]
        self.held = [[0] * len(shape.requests) for _ in range(shape.layers)]
        self.total = [0] * len(shape.requests)

    def _pages(self, layer: int, r: int, total: int) -> int:
        prompt = self.shape.requests[r][0]
        kept = self.budgets.kept(prompt)[layer]
        return sum(-(-(min(k, prompt) + total - prompt) // self.shape.block_size) for k in kept)

    def step(self, step: int) -> tuple[StepInputs, list[Prefill | Decode | None]]:
        """The step's inputs and what each request does in it (None: nothing yet)."""
        qlens, kinds, start = [], [], 0
        for r, (prompt, generated, arrives) in enumerate(self.shape.requests):
            q = prompt + generated if step == arrives else (1 if step > arrives else 0)
            self.total[r] += q
            kinds.append(Prefill(start, prompt, generated) if step == arrives else Decode(start) if q else None)
            qlens.append(q)
            start += q
            if q:
                self._allocate(r)
        qsl = torch.tensor([0] + qlens).cumsum(0).int()
        inputs = StepInputs(query_start_loc=qsl, seq_lens=torch.tensor(self.total),
                            prompt_lens=torch.tensor([p for p, _, _ in self.shape.requests]),
                            num_actual_tokens=int(qsl[-1]))
        return inputs, kinds

    def _allocate(self, r: int) -> None:
        """Free pages onto request ``r``'s rows until they hold what its heads need."""
        for layer in range(self.shape.layers):
            need = self._pages(layer, r, self.total[r])
            while self.held[layer][r] < need:
                self.tables[layer][r, self.held[layer][r]] = self.free.pop()
                self.held[layer][r] += 1

    def qkv(self, num_tokens: int) -> torch.Tensor:
        """[T, (Hq + 2 Hkv) d] fp32, as a fused QKV projection gives them (q, k, v are strided views)."""
        s = self.shape
        return torch.randn(num_tokens, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim, generator=self.gen)


def split_qkv(qkv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = shape.head_dim
    return qkv.split([shape.num_heads * d, shape.num_kv_heads * d, shape.num_kv_heads * d], dim=1)


def padded_rows(num_tokens: int) -> int:
    """Rows of the step's q/k/v/output as vLLM's piecewise CUDA graphs pass them: the
    token count rounded up to a captured size (a multiple of 8 here), plus a few more,
    so that there is padding even when the count is a multiple of 8."""
    return -(-num_tokens // 8) * 8 + 3
