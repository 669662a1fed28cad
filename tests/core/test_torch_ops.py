"""Semantic tests of the PyTorch ops the CPU path runs (the kernels' references)."""

import torch

from headkv_vllm.kernels.paged_decode import paged_decode_ref
from headkv_vllm.kernels.select_store import select_and_store_ref
from headkv_vllm.kernels.window_scores import window_scores_ref


def test_window_scores_rows_are_pooled_attention():
    torch.manual_seed(0)
    n, w, hq, hkv, d = 40, 8, 6, 2, 16
    q, k = torch.randn(n, hq, d), torch.randn(n, hkv, d)
    scores = window_scores_ref(q[n - w :], k, d**-0.5, pool_kernel=1)
    g = hq // hkv
    for h in range(hkv):
        logits = torch.einsum("wgd,nd->gwn", q[n - w :, h * g : (h + 1) * g], k[:, h]) * d**-0.5
        mask = torch.arange(n)[None, :] > torch.arange(n - w, n)[:, None]
        expect = logits.masked_fill(mask, float("-inf")).softmax(-1)[..., : n - w].mean((0, 1))
        torch.testing.assert_close(scores[h], expect, atol=1e-6, rtol=1e-5)  # fp32 vs fp32


def test_select_keeps_top_scored_then_window_and_stores_in_pages():
    torch.manual_seed(0)
    prefix, w, hkv, d, bs = 30, 4, 3, 8, 4
    t = prefix + w
    scores = torch.rand(hkv, prefix)
    k, v = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    caps = torch.tensor([0, 5, 30])
    lengths = caps + w
    lmax = int(lengths.max())
    perm = torch.randperm(64)[: hkv * -(-lmax // bs)].view(hkv, -1)  # scattered pages per head
    slots = (perm[:, torch.arange(lmax) // bs] * bs + torch.arange(lmax) % bs)
    pages = torch.zeros(64, 2, bs, d)
    select_and_store_ref(scores, k, v, caps, lengths, slots, pages)
    for h in range(hkv):
        top = scores[h].topk(int(caps[h])).indices.sort().values
        expect = torch.cat([top, torch.arange(prefix, t)])
        s = slots[h, : int(lengths[h])]
        torch.testing.assert_close(pages[s // bs, 0, s % bs], k[expect, h], atol=0, rtol=0)
        torch.testing.assert_close(pages[s // bs, 1, s % bs], v[expect, h], atol=0, rtol=0)


def test_paged_decode_equals_dense_attention_per_head():
    torch.manual_seed(0)
    b, hq, hkv, d, bs = 2, 9, 3, 16, 8
    lengths = torch.tensor([[5, 17, 1], [9, 2, 24]])
    lmax = int(lengths.max())
    pages = torch.randn(200, 2, bs, d)
    blocks = torch.randperm(200)[: b * hkv * -(-lmax // bs)].view(b, hkv, -1)
    p = torch.arange(lmax)
    slots = blocks[:, :, p // bs] * bs + p % bs
    q = torch.randn(b, hq, d)
    out = paged_decode_ref(q, pages, slots, lengths, d**-0.5)
    for i in range(b):
        for qh in range(hq):
            h = qh // 3
            s = slots[i, h, : int(lengths[i, h])]
            K, V = pages[s // bs, 0, s % bs], pages[s // bs, 1, s % bs]
            expect = ((q[i, qh] @ K.T) * d**-0.5).softmax(-1) @ V
            torch.testing.assert_close(out[i, qh], expect, atol=1e-5, rtol=1e-5)  # fp32
