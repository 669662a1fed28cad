"""Checks, sizes and small jit functions shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


def require_launchable(kernel, *tensors: torch.Tensor) -> None:
    """A compiled kernel needs CUDA tensors on one device; under Triton's
    interpreter (TRITON_INTERPRET=1 set before ``headkv_vllm.kernels`` is
    imported) CPU tensors work too. Fails here rather than deep inside Triton."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors of a HeadKV kernel must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if isinstance(kernel, JITFunction) and device.type != "cuda":
        raise RuntimeError(
            f"the Triton kernel got {device} tensors: use CUDA tensors, the `_ref` op, or set "
            "TRITON_INTERPRET=1 before importing headkv_vllm.kernels to interpret it on the CPU."
        )


def upcast_dot(kernel, dtype: torch.dtype) -> bool:
    """Whether ``dot_fp32_acc`` should run in fp32: always for fp32 inputs (no
    TF32 rounding), and for bf16 under the interpreter, whose dot reads bf16 as
    raw 16-bit integers. (bf16 x bf16 products are exact in fp32, so both paths
    compute the same sums.)"""
    interpreted = not isinstance(kernel, JITFunction)
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


@triton.jit
def dot_fp32_acc(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep CPU tests fast
