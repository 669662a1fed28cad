"""One transformers forward of a prompt that keeps, per layer, the post-RoPE keys of
every position and the post-RoPE queries of the last rows only: what the engine's
window scoring reads (``kernels.window_scores``), without an n x n attention matrix.

The capture is an attention function registered with transformers: it records its
inputs and hands them to transformers' SDPA attention, so the forward is unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

IMPLEMENTATION = "headkv_capture_qk"


@dataclasses.dataclass(frozen=True)
class PromptQK:
    first_row: int  # q[l][i] is the query of position first_row + i
    q: list[torch.Tensor]  # per layer [n - first_row, Hq, d] float32
    k: list[torch.Tensor]  # per layer [n, Hkv, d] float32
    scale: float

    def window_queries(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Queries of positions [start, end): [end - start, Hq, d]."""
        if start < self.first_row:
            raise ValueError(f"queries from position {start} were not captured (first captured row {self.first_row}).")
        return self.q[layer][start - self.first_row : end - self.first_row]


class _Capture:
    def __init__(self):
        self.first_row = 0
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.scale: float | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        # query [1, Hq, n, d], key [1, Hkv, n, d], both after RoPE
        layer = module.layer_idx
        self.q[layer] = query[0, :, self.first_row :].transpose(0, 1).float().clone()
        self.k[layer] = key[0].transpose(0, 1).float().clone()
        self.scale = float(scaling if scaling is not None else module.scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


_CAPTURE = _Capture()


def load_model(model_dir: str | Path):
    """The model in float32 on the CPU, its attention routed through the capture."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _CAPTURE)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=IMPLEMENTATION)
    return model.eval()


@torch.no_grad()
def capture(model, ids: list[int] | tuple[int, ...], first_row: int) -> PromptQK:
    """Post-RoPE queries of positions >= ``first_row`` and keys of all positions, per layer."""
    _CAPTURE.first_row, _CAPTURE.q, _CAPTURE.k = first_row, {}, {}
    model.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    layers = range(model.config.num_hidden_layers)
    if sorted(_CAPTURE.k) != list(layers):
        raise RuntimeError(f"captured layers {sorted(_CAPTURE.k)}, expected 0..{len(layers) - 1}: the model's "
                           f"attention did not go through the capture.")
    qk = PromptQK(first_row, [_CAPTURE.q[l] for l in layers], [_CAPTURE.k[l] for l in layers], _CAPTURE.scale)
    _CAPTURE.q, _CAPTURE.k = {}, {}
    return qk
