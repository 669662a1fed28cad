"""The step plan: everything about a step that every layer shares, built once.

vLLM calls the metadata builder once per KV-cache group per step, and under HeadKV
every layer is its own group. The plan is what does not depend on the layer:
which requests prefill and which decode, their lengths and token rows, and for
every layer at once what each head kept of the prompt (``kept [L, R, Hkv]``) and
holds after the step (``lengths [L, R, Hkv]``). A layer reads its row of those
two tensors; nothing else differs between layers.

Built on the host from vLLM's host-side copies (query start locations, sequence
lengths, prompt lengths), then copied to the device in one transfer. Layer code
reads only device tensors and the host ints stored here, so it never waits on
the device.

Lengths of request r in a step (docs/kv_layout.md, "Head lengths")::

    tokens:   |<---------- total[r] ---------->|
              |<- computed ->|<- query_len[r] ->|
    prompt:   |<----- prompt[r] ----->|
    head h:   kept[l, r, h] prompt tokens (window included) + (total - prompt) generated
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headkv_vllm.method.budgets import Budgets


@dataclass(frozen=True)
class StepInputs:
    """What the plan is built from: host (CPU) tensors of the step, one entry per
    request row (padding rows have ``query_len == 0``)."""

    query_start_loc: torch.Tensor  # [R + 1] int, token offset of each request in the step
    seq_lens: torch.Tensor  # [R] int, tokens computed once the step is done
    prompt_lens: torch.Tensor  # [R] int, prompt length (0 where unknown: treated as all prompt)
    num_actual_tokens: int


@dataclass(frozen=True)
class PrefillPlan:
    """A request prefilled in this step: step tokens ``[start, start + num_tokens)``.

    ``num_tokens > prompt_len`` only when a preempted request is recomputed
    (its prompt, then the tokens it had generated).
    """

    row: int  # request row
    start: int
    prompt_len: int
    num_tokens: int
    window: int  # min(window, prompt_len)
    max_len: int  # longest head of any layer after the step (sizes slot tables)
    needs_scores: tuple[bool, ...]  # [L] False where every head keeps the whole prompt

    @property
    def generated(self) -> int:
        return self.num_tokens - self.prompt_len


@dataclass(frozen=True)
class StepPlan:
    num_actual_tokens: int
    block_size: int
    kept: torch.Tensor  # [L, R, Hkv] int32 device
    lengths: torch.Tensor  # [L, R, Hkv] int32 device
    kept_host: torch.Tensor  # [L, R, Hkv] int32 host (the CPU page store builds page lists from it)
    lengths_host: torch.Tensor  # [L, R, Hkv] int32 host
    prompt_lens: tuple[int, ...]  # [R]
    prefills: tuple[PrefillPlan, ...]
    decode_tokens: torch.Tensor  # [D] int64 device, step-token row of each decode
    decode_span: tuple[int, int] | None  # the same rows as a range when they are contiguous
    decode_reqs: torch.Tensor  # [D] int64 device, request row of each decode
    decode_reqs_host: torch.Tensor  # [D] int64 host
    decode_req_span: tuple[int, int] | None  # decode request rows as a range when contiguous
    decode_max_len: int  # longest decode head of any layer (sizes the decode grid)
    max_pages: int  # most pages any head of any layer holds
    # The prefills' prompt tokens packed for one variable-length attention call:
    prefill_tokens: torch.Tensor  # [sum prompt_len] int64 device, step-token rows
    prefill_span: tuple[int, int] | None  # the same rows as a range when they are contiguous
    prefill_cu_seqlens: torch.Tensor  # [P + 1] int32 device, offsets into the packed tokens
    prefill_max_len: int

    @property
    def num_decodes(self) -> int:
        return self.decode_reqs_host.numel()


class KeptTable:
    """``Budgets.kept`` as tensors: ``rows(prompt_lens) -> [L, R, Hkv]`` int32 (host),
    cached per prompt length and per batch of prompt lengths (a decode step sees
    the same requests as the step before)."""

    def __init__(self, budgets: Budgets):
        self.budgets = budgets
        self._by_len: dict[int, torch.Tensor] = {}
        self._last: tuple[tuple[int, ...], torch.Tensor] | None = None

    MAX_PROMPT_LENGTHS = 4096  # cached rows ([L, Hkv] each) before the cache restarts

    def one(self, prompt_len: int) -> torch.Tensor:
        t = self._by_len.get(prompt_len)
        if t is None:
            if len(self._by_len) >= self.MAX_PROMPT_LENGTHS:
                self._by_len.clear()
            t = self._by_len[prompt_len] = torch.tensor(self.budgets.kept(prompt_len), dtype=torch.int32)
        return t

    def rows(self, prompt_lens: list[int]) -> torch.Tensor:
        key = tuple(prompt_lens)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key:
            t = torch.stack([self.one(n) for n in key], dim=1)
        else:
            t = torch.zeros(self.budgets.num_layers, 0, self.budgets.num_kv_heads, dtype=torch.int32)
        self._last = (key, t)
        return t


class UnsupportedStep(RuntimeError):
    pass


def build_step_plan(inputs: StepInputs, kept_table: KeptTable, block_size: int,
                    device: torch.device | str, pin_memory: bool = False) -> StepPlan:
    """The plan of one step (host work, once per step for all layers). ``pin_memory``:
    stage the host-to-device copy in pinned memory (CUDA, where the platform allows)."""
    qsl = inputs.query_start_loc.long()
    n = qsl.numel() - 1
    qlen = qsl[1:] - qsl[:-1]
    total = inputs.seq_lens[:n].long()
    prompt = inputs.prompt_lens[:n].long()
    prompt = torch.where(prompt > 0, prompt, total)  # unknown (dummy rows): all prompt
    computed = total - qlen
    is_prefill = (computed == 0) & (qlen > 0) & (total >= prompt)  # a whole prompt (+ recomputed tokens)
    is_decode = (computed >= prompt) & (qlen == 1)
    bad = (qlen > 0) & ~is_prefill & ~is_decode
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise UnsupportedStep(
            f"HeadKV: request row {i} computes {int(qlen[i])} tokens after {int(computed[i])} "
            f"(prompt {int(prompt[i])}): only whole-prompt prefills and 1-token decodes are supported "
            "(chunked prefill and speculative decoding are off under HeadKV)."
        )
    prompt_list = prompt.tolist()
    kept = kept_table.rows(prompt_list)  # [L, R, H]
    prompt_part = torch.minimum(prompt, total).to(torch.int32)
    generated = (total - prompt).clamp(min=0).to(torch.int32)
    lengths = torch.minimum(kept, prompt_part[None, :, None]) + generated[None, :, None]

    window = kept_table.budgets.window
    head_max = lengths.amax(dim=(0, 2)).tolist() if n else []  # [R] longest head over layers
    prefix_full = (kept >= prompt.to(torch.int32)[None, :, None]).all(dim=2)  # [L, R] every head keeps all
    qsl_list, total_list = qsl.tolist(), total.tolist()
    prefill_rows = is_prefill.nonzero().flatten().tolist()
    prefills = tuple(
        PrefillPlan(
            row=i, start=qsl_list[i], prompt_len=prompt_list[i], num_tokens=total_list[i],
            window=min(window, prompt_list[i]), max_len=int(head_max[i]),
            needs_scores=tuple((~prefix_full[:, i]).tolist()),
        )
        for i in prefill_rows
    )
    decode_reqs = is_decode.nonzero().flatten()
    decode_rows = qsl[decode_reqs].tolist()
    decode_span = (decode_rows[0], decode_rows[-1] + 1) \
        if decode_rows and decode_rows[-1] - decode_rows[0] == len(decode_rows) - 1 else None
    d_reqs = decode_reqs.tolist()
    decode_req_span = (d_reqs[0], d_reqs[-1] + 1) if d_reqs and d_reqs[-1] - d_reqs[0] == len(d_reqs) - 1 else None
    decode_max = max((head_max[i] for i in decode_reqs.tolist()), default=0)
    max_pages = max(1, -(-max(head_max, default=0) // block_size))

    spans = [(pf.start, pf.start + pf.prompt_len) for pf in prefills]
    prefill_tokens = torch.cat([torch.arange(a, b, dtype=torch.int32) for a, b in spans]) if spans \
        else torch.zeros(0, dtype=torch.int32)
    contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    cu = torch.tensor([0] + [pf.prompt_len for pf in prefills], dtype=torch.int32).cumsum(0, dtype=torch.int32)

    # One host-to-device copy for the step.
    parts = [kept.flatten(), lengths.flatten(), qsl[decode_reqs].int(), decode_reqs.int(), prefill_tokens, cu]
    host = torch.cat(parts)
    dev = torch.device(device)
    if dev.type == "cpu":
        staged = host
    elif pin_memory:
        staged = host.pin_memory().to(dev, non_blocking=True)
    else:
        staged = host.to(dev)
    kept_dev, lengths_dev, decode_tokens, decode_reqs_dev, prefill_tokens_dev, cu_dev = \
        staged.split([t.numel() for t in parts])
    return StepPlan(
        num_actual_tokens=inputs.num_actual_tokens, block_size=block_size,
        kept=kept_dev.view(kept.shape), lengths=lengths_dev.view(kept.shape), kept_host=kept, lengths_host=lengths,
        prompt_lens=tuple(prompt_list), prefills=prefills, decode_tokens=decode_tokens.long(), decode_span=decode_span, decode_reqs=decode_reqs_dev.long(),
        decode_reqs_host=decode_reqs, decode_req_span=decode_req_span, decode_max_len=int(decode_max), max_pages=max_pages,
        prefill_tokens=prefill_tokens_dev.long(), prefill_span=(spans[0][0], spans[-1][1]) if spans and contiguous else None,
        prefill_cu_seqlens=cu_dev, prefill_max_len=max((pf.prompt_len for pf in prefills), default=0),
    )
