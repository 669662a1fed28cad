"""The CPU engine's ops (``engine.cpu_page_store``): vLLM's CPU cache and attention ops
with one sequence per (query token, KV head), against the PyTorch reference
``paged_decode_ref`` on plain pages; and the CPU prompt attention against SDPA."""

from __future__ import annotations

import pytest
import torch

from headkv_vllm.kernels.paged_decode import paged_decode_ref
from headkv_vllm.core.plan import KeptTable, StepInputs, build_step_plan
from headkv_vllm.core.prompt_attention import sdpa_prefill
from headkv_vllm.engine.vllm_access import cpu_attention_isa, cpu_attention_schedule
from headkv_vllm.engine.cpu_page_store import CpuPromptAttention, HeadSequences, attend_head_pages, store_tokens
from headkv_vllm.method.budgets import Budgets

# Both sides accumulate in fp32; bf16 pages round the inputs the same way on both.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def run_cpu_path(q, plain_pages, head_blocks, lengths, scale):
    """Copy each head's positions from plain pages through the store op, then attend."""
    num_blocks, _, block_size, d = plain_pages.shape
    batch, heads, _ = head_blocks.shape
    isa = cpu_attention_isa(q.dtype, block_size, d)
    packed = torch.zeros_like(plain_pages)
    p = torch.arange(int(lengths.max()))
    slots = head_blocks[..., p // block_size] * block_size + p % block_size  # [B, H, Lmax]
    valid = p < lengths[..., None]
    used = slots[valid]
    store_tokens(plain_pages[used // block_size, 0, used % block_size],
                 plain_pages[used // block_size, 1, used % block_size], packed, used, isa)
    seq_lens = lengths.flatten().to(torch.int32)
    qsl = torch.arange(seq_lens.numel() + 1, dtype=torch.int32)
    group = q.shape[1] // heads
    schedule = cpu_attention_schedule(seq_lens, qsl, group, 1, d, q.dtype, isa)
    grouped = q.reshape(-1, group, d).contiguous()
    out = torch.empty_like(grouped)
    seqs = HeadSequences(qsl, seq_lens, head_blocks.reshape(batch * heads, -1).to(torch.int32), schedule)
    attend_head_pages(grouped, packed, out, seqs, scale)
    return out.view(q.shape), slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(9, 3), (4, 4), (8, 2)])
def test_cpu_head_attention_equals_reference(dtype, block_size, num_q_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_q_heads * 100 + block_size)
    batch, d = 5, 64
    lengths = torch.randint(1, 300, (batch, num_kv_heads), generator=gen)
    lengths[0, 0], lengths[-1, -1] = 1, block_size  # a head of one token, one exactly full page
    pages_per_head = int(-(-lengths.max() // block_size))
    num_blocks = 1 + batch * num_kv_heads * pages_per_head + 7
    head_blocks = (torch.randperm(num_blocks - 1, generator=gen)[: batch * num_kv_heads * pages_per_head] + 1)
    head_blocks = head_blocks.view(batch, num_kv_heads, pages_per_head)
    plain = torch.randn(num_blocks, 2, block_size, d, generator=gen).to(dtype)
    q = torch.randn(batch, num_q_heads, d, generator=gen).to(dtype)
    scale = d**-0.5
    got, slots = run_cpu_path(q, plain, head_blocks, lengths, scale)
    want = paged_decode_ref(q, plain, slots, lengths, scale)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(9, 3), (4, 4), (8, 2)])
def test_cpu_prompt_attention_equals_sdpa(num_q_heads, num_kv_heads):
    """Packed prompts of odd lengths (one below a block, one of many blocks) through
    vLLM's CPU attention op on the scratch cache, twice (the scratch is reused)."""
    d, bs = 64, 16
    lens = [5, 300, 47, 129, 1000]
    qsl = torch.tensor([0] + lens).cumsum(0).int()
    plan = build_step_plan(StepInputs(qsl, torch.tensor(lens), torch.tensor(lens), int(qsl[-1])),
                           KeptTable(Budgets(caps=((1,) * num_kv_heads,), window=4)), bs, "cpu")
    attend = CpuPromptAttention(torch.float32, d, num_q_heads, num_kv_heads)
    # a scratch cache as reused or uninitialised memory can leave it: NaN everywhere
    attend._scratch = torch.full((2, 64, num_kv_heads, attend.block_size, d), float("nan"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        m = int(qsl[-1])
        # q, k, v as the model hands them over: views into one fused qkv projection
        qkv = torch.randn(m, (num_q_heads + 2 * num_kv_heads) * d, generator=gen)
        q, k, v = (t.view(m, -1, d) for t in qkv.split([num_q_heads * d, num_kv_heads * d, num_kv_heads * d], -1))
        torch.testing.assert_close(attend(q, k, v, plan, 0.125), sdpa_prefill(q, k, v, plan, 0.125),
                                   **TOLERANCE[torch.float32])


def test_chunked_prefill_equals_one_step_prefill_on_the_cpu_store():
    """tests/core/test_chunked_prefill_core.py's scenario on the CPU store: prompt chunks in plain
    uncompressed pages and vLLM's CPU attention over earlier chunks; compressed pages
    written and read by vLLM's CPU ops."""
    from test_chunked_prefill_core import D, HKV, HQ, BS, assert_chunked_equals_one_step
    from headkv_vllm.engine.cpu_page_store import CpuPageStore

    assert_chunked_equals_one_step(lambda: CpuPageStore(torch.float32, BS, D, HQ, HKV), device=torch.device("cpu"))
