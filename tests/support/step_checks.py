"""The step harness's comparisons: tolerances, element-wise and exact comparisons, named
checks accumulated over steps and layers, and CUDA's host-sync guard."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

# Device route vs the fp32 reference route. fp16/bf16: the kernels round softmax
# weights to the cache dtype before P @ V and round the output (tests/kernels/test_kernels_decode.py);
# fp32: SDPA and the split-K kernel sum in a different order than the CPU.
OUTPUT_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
SCORE_TOL = dict(atol=1e-6, rtol=1e-4)  # fp32 softmax on both sides (tests/kernels/test_kernels_window_scores.py)
ORACLE_TOL = dict(atol=5e-5, rtol=5e-5)  # fp32 vs fp32 on the CPU
OUTPUT_SENTINEL = -1000.0  # the output's rows before the forward (exact in every dtype)


def compare(got: torch.Tensor, expect: torch.Tensor, atol: float, rtol: float) -> dict:
    """Element-wise ``|got - expect| <= atol + rtol * |expect|`` (NaN fails), on the CPU in fp32."""
    got, expect = got.detach().float().cpu(), expect.detach().float().cpu()
    if got.shape != expect.shape:
        return {"pass": False, "error": f"shape {tuple(got.shape)} != {tuple(expect.shape)}"}
    if got.numel() == 0:
        return {"pass": True, "max_abs_err": 0.0, "bad": 0, "n": 0}
    diff = (got - expect).abs()
    bound = atol + rtol * expect.abs()
    bad = ~(diff <= bound)
    worst = diff.nan_to_num(nan=math.inf)
    return {"pass": not bool(bad.any()), "max_abs_err": float(worst.max()),
            "max_err_over_tol": float((worst / bound).max()), "bad": int(bad.sum()), "n": got.numel()}


def compare_exact(got: torch.Tensor, expect: torch.Tensor) -> dict:
    got, expect = got.detach().float().cpu(), expect.detach().float().cpu()
    if got.shape != expect.shape:
        return {"pass": False, "error": f"shape {tuple(got.shape)} != {tuple(expect.shape)}"}
    bad = int((got != expect).sum())
    return {"pass": bad == 0, "bad": bad, "n": got.numel()}


class Checks:
    """Named checks accumulated over steps and layers: counts, worst error, first failure."""

    def __init__(self):
        self.items: dict[str, dict] = {}

    def add(self, name: str, result: dict, where: str, **tol) -> bool:
        item = self.items.setdefault(name, {"pass": True, "count": 0, "failures": 0, **tol})
        item["count"] += 1
        for key in ("max_abs_err", "max_err_over_tol"):
            if key in result:
                item[key] = max(item.get(key, 0.0), result[key])
        if not result["pass"]:
            item["pass"] = False
            item["failures"] += 1
            item.setdefault("first_failure", {"where": where, **{k: v for k, v in result.items() if k != "pass"}})
        return result["pass"]

    def ok(self, name: str, passed: bool, where: str, detail: str = "") -> bool:
        return self.add(name, {"pass": passed, **({"detail": detail} if detail else {})}, where)

    @property
    def failed(self) -> set[str]:
        return {name for name, item in self.items.items() if not item["pass"]}


def is_host_sync_error(error: BaseException) -> bool:
    """The error ``torch.cuda.set_sync_debug_mode("error")`` raises on a host sync."""
    return isinstance(error, RuntimeError) and "synchroniz" in str(error).lower()


@contextmanager
def no_host_sync(device: torch.device):
    """On CUDA: any op that synchronises the host with the device raises."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
