"""Triton window scores vs the PyTorch reference (kernels/window_scores.py)."""

import pytest
import torch

from headkv_vllm.kernels.window_scores import window_scores, window_scores_ref, window_scores_triton
from support.kernel_cases import DEVICE, DTYPES

# (n prompt tokens, window w, Hq, Hkv, head_dim, pool kernel)
CASES = [
    (40, 8, 9, 3, 16, 7),  # GQA 9:3
    (301, 8, 5, 1, 32, 7),  # 5:1, odd length, several key tiles and splits
    (67, 4, 4, 4, 64, 3),  # 1:1
    (129, 8, 32, 8, 128, 7),  # Llama-3-8B heads
    (9, 8, 9, 3, 16, 7),  # one prefix position
    (12, 8, 4, 2, 16, 1),  # no pooling; prefix shorter than the pool
    (1000, 8, 2, 1, 16, 7),  # long prompt: many tiles per split
]


def _inputs(n, w, hq, hkv, d, dtype, key_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g) * key_scale
    return q.to(dtype).to(DEVICE)[n - w :], k.to(dtype).to(DEVICE)  # q_win is a view, as in the backend


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,w,hq,hkv,d,pool", CASES)
def test_matches_reference(n, w, hq, hkv, d, pool, dtype):
    q_win, k = _inputs(n, w, hq, hkv, d, dtype)
    got = window_scores_triton(q_win, k, d**-0.5, pool)
    expect = window_scores_ref(q_win, k, d**-0.5, pool)
    assert got.shape == (hkv, n - w) and got.dtype == torch.float32
    # Both compute logits from the same (exactly upcast) inputs and softmax in fp32,
    # so every input dtype gets fp32 tolerances: only summation order differs.
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_peaked_logits_are_stable(dtype):
    # Large logits: a few keys take almost all the mass; online max/sum must not overflow.
    q_win, k = _inputs(200, 8, 6, 2, 32, dtype, key_scale=8.0, seed=1)
    got = window_scores_triton(q_win, k, 32**-0.5, 7)
    expect = window_scores_ref(q_win, k, 32**-0.5, 7)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-4)  # fp32 softmax on both sides


@pytest.mark.parametrize("n", [1, 5, 8])
def test_prompt_not_longer_than_window_has_no_prefix(n):
    q_win, k = _inputs(n, min(8, n), 9, 3, 16, torch.float16)
    got = window_scores_triton(q_win, k, 0.25, 7)
    assert got.shape == (3, 0)
    assert window_scores_ref(q_win, k, 0.25, 7).shape == (3, 0)


def test_scores_are_mean_window_attention_without_pooling():
    # Independent of the reference: per head, the mean of the group's window rows.
    n, w, hq, hkv, d = 50, 6, 6, 2, 16
    q_win, k = _inputs(n, w, hq, hkv, d, torch.float32, seed=2)
    got = window_scores_triton(q_win, k, d**-0.5, 1).cpu()
    q_win, k = q_win.cpu(), k.cpu()
    for h in range(hkv):
        rows = []
        for i in range(w):
            for qh in range(h * 3, h * 3 + 3):
                p = torch.softmax((k[: n - w + i + 1, h] @ q_win[i, qh]) * d**-0.5, 0)
                rows.append(p[: n - w])
        torch.testing.assert_close(got[h], torch.stack(rows).mean(0), atol=1e-6, rtol=1e-4)  # fp32


def test_dispatch_uses_triton_only_for_cuda_tensors():
    q_win, k = _inputs(30, 8, 4, 2, 16, torch.float32)
    got = window_scores(q_win, k, 0.25, 7)
    torch.testing.assert_close(got, window_scores_ref(q_win, k, 0.25, 7), atol=1e-6, rtol=1e-4)  # fp32


def test_rejects_even_pool_kernel_and_bad_groups():
    q_win, k = _inputs(30, 8, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="odd"):
        window_scores_triton(q_win, k, 0.25, 4)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        window_scores_triton(q_win[:, :3], k, 0.25, 7)
