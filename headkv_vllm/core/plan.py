"""The step plan: everything about a step that every layer shares, built once.

vLLM calls the metadata builder once per KV-cache group per step, and under HeadKV
every layer is its own group. The plan is what does not depend on the layer:
which requests prefill and which decode, their lengths and token rows, and for
every layer at once what each head kept of the prompt (``layout.kept [L, R, Hkv]``)
and holds after the step (``layout.lengths [L, R, Hkv]``). A layer reads its row of
those two tensors; nothing else differs between layers. ``StepPlan`` draws its parts.

Built on the host from vLLM's host-side copies (query start locations, sequence
lengths, prompt lengths), then copied to the device in one transfer. Layer code
reads only device tensors and the host ints stored here, so it never waits on
the device.

Lengths of request r in a step (docs/kv_layout.md, "Head lengths")::

    tokens:   |<---------- total[r] ---------->|
              |<- computed ->|<- query_len[r] ->|
    prompt:   |<----- prompt[r] ----->|
    head h:   kept[l, r, h] prompt tokens (window included) + (total - prompt) generated

A prompt prefilled in chunks (``total < prompt``) holds all ``total`` tokens in every
head until its last chunk (docs/kv_layout.md, "Chunked prefill"); its row then starts
with ``layout.offsets[l, r]`` null entries, and its canonical row is the row past them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headkv_vllm.method.bounded import BoundedCache
from headkv_vllm.method.budgets import BudgetRule, Budgets


@dataclass(frozen=True)
class StepInputs:
    """What the plan is built from: host (CPU) tensors of the step, one entry per
    request row (padding rows have ``query_len == 0``)."""

    query_start_loc: torch.Tensor  # [R + 1] int, token offset of each request in the step
    seq_lens: torch.Tensor  # [R] int, tokens computed once the step is done
    prompt_lens: torch.Tensor  # [R] int, prompt length (0 where unknown: treated as all prompt)
    num_actual_tokens: int
    # [L, R] int block-table entries each layer's row holds (null entries included), from the
    # scheduler; checked against the layout and gives each row's leading nulls. None: no
    # check, no leading nulls (dummy batches, unit tests).
    row_counts: torch.Tensor | None = None
    request_keys: tuple[str, ...] | None = None  # request ids by row (saved window queries)
    # [R] each request's own KV size (int or "full"; None: the server's). None: all the server's.
    kv_sizes: tuple | None = None


@dataclass(frozen=True)
class PrefillPlan:
    """A request computing more than a decode token in this step: step tokens
    ``[start, start + num_tokens - computed)`` are its positions ``[computed, num_tokens)``.

    Kinds (docs/kv_layout.md, "Phases of a request"): a whole prompt (``computed == 0``,
    ``num_tokens >= prompt_len``); a prompt chunk (``num_tokens < prompt_len``); a last
    prompt chunk (``0 < computed < prompt_len <= num_tokens``); the generated tokens of a
    recomputed request (``computed >= prompt_len``). ``num_tokens > prompt_len`` only when
    a preempted request is recomputed (its prompt, then the tokens it had generated).
    """

    row: int  # request row
    start: int
    prompt_len: int
    num_tokens: int
    window: int  # min(window, prompt_len)
    max_len: int  # longest head of any layer after the step (sizes slot tables)
    needs_scores: tuple[bool, ...]  # [L] False where every head keeps the whole prompt
    computed: int = 0  # tokens computed before the step
    key: str = ""  # request id (window queries saved across chunks)

    @property
    def generated(self) -> int:
        return self.num_tokens - self.prompt_len

    @property
    def compresses(self) -> bool:
        """The prompt is scored and compressed in this step."""
        return self.computed < self.prompt_len <= self.num_tokens

    @property
    def context(self) -> int:
        """Prompt tokens already in the (uncompressed) pages before the step."""
        return min(self.computed, self.prompt_len)

    @property
    def prompt_queries(self) -> int:
        """Prompt tokens computed in the step (the first step rows)."""
        return max(0, min(self.num_tokens, self.prompt_len) - self.computed)

    @property
    def new_generated(self) -> int:
        """Generated tokens recomputed in the step (the step rows after the prompt's)."""
        return max(0, self.num_tokens - max(self.computed, self.prompt_len))

    @property
    def saved_window(self) -> int:
        """Window queries that earlier chunks computed (saved until the last chunk)."""
        return max(0, self.context - (self.prompt_len - self.window))


@dataclass(frozen=True)
class RowLayout:
    """What every layer's block-table rows hold once the step is done, per layer ``l``,
    request row ``r`` and KV head ``h`` (docs/kv_layout.md, "Page tables"). Device
    tensors for the kernels, their host twins for host-side page lists (the CPU store)."""

    kept: torch.Tensor  # [L, R, Hkv] int32 device, prompt tokens each head keeps (window included)
    lengths: torch.Tensor  # [L, R, Hkv] int32 device, tokens each head holds
    offsets: torch.Tensor  # [L, R] int32 device, leading null entries of each row (a chunked prompt's)
    kept_host: torch.Tensor  # [L, R, Hkv] int32 host
    lengths_host: torch.Tensor  # [L, R, Hkv] int32 host
    offsets_host: torch.Tensor  # [L, R] int32 host
    has_offsets: bool  # some row starts with null entries
    max_pages: int  # most pages any head of any layer holds
    # What ``kept`` follows from, per row: the prompt length and the request's own KV size
    # (None: the server's). Equal pairs have equal ``kept`` (host caches key on them).
    prompt_lens: tuple[int, ...]  # [R]
    kv_sizes: tuple[int | str | None, ...]  # [R]


@dataclass(frozen=True)
class DecodeRows:
    """The ``D`` requests that decode one token in the step."""

    tokens: torch.Tensor  # [D] int64 device, step-token row of each decode
    span: tuple[int, int] | None  # ``tokens`` as a range [a, b) when contiguous (slices, no gather)
    reqs: torch.Tensor  # [D] int64 device, request row of each decode
    reqs_host: torch.Tensor  # [D] int64 host
    req_span: tuple[int, int] | None  # ``reqs`` as a range when contiguous
    max_len: int  # longest decode head of any layer (sizes the decode grid)

    @property
    def count(self) -> int:
        return self.reqs_host.numel()


@dataclass(frozen=True)
class PackedPrompts:
    """The prompt tokens computed in the step, of the ``P`` prefills that have some,
    packed for one variable-length causal attention call (``core.prompt_attention``).
    Queries: the step's prompt rows. Keys: each prompt so far (an earlier chunk's tokens
    read from the pages, then the step's), equal to the queries without chunks."""

    tokens: torch.Tensor  # [M] int64 device, step-token row of each packed query
    span: tuple[int, int] | None  # ``tokens`` as a range [a, b) when contiguous
    cu_seqlens_q: torch.Tensor  # [P + 1] int32 device, query offsets into the packed rows
    max_len_q: int
    cu_seqlens_k: torch.Tensor  # [P + 1] int32 device, key offsets
    max_len_k: int
    has_context: bool  # some prefill continues a prompt begun in an earlier step


@dataclass(frozen=True)
class StepPlan:
    """One step, for every layer. Its parts, and how they index the step::

        StepPlan
        |- layout: RowLayout        per (layer, request row, KV head): kept, lengths; per
        |                           (layer, row): leading nulls. Indexed by request row.
        |- decode: DecodeRows       requests decoding one token: request rows, step rows
        |- prefills: PrefillPlan..  one per request computing more: its row, step rows, kind
        |- prompts: PackedPrompts   the prefills' prompt rows packed for prompt attention
        '- window_stash             window queries saved across a prompt's chunks

        request row r:    0        1                 2         3 (a chunk, c tokens earlier)
        step tokens:     [0]  [1 .......... 300]   [301]  [302 ......... 402]
        decode.reqs    = [0, 2]       decode.tokens  = [0, 301]        (span: None)
        prefills       = (row 1, start 1), (row 3, start 302, computed c)
        prompts.tokens = [1 .. 300, 302 .. 402]     cu_seqlens_q = [0, 300, 401]
                                                    cu_seqlens_k = [0, 300, 401 + c]
    """

    num_actual_tokens: int
    block_size: int
    layout: RowLayout
    decode: DecodeRows
    prefills: tuple[PrefillPlan, ...]
    prompts: PackedPrompts
    window_stash: "WindowStash | None" = None

    @property
    def num_decodes(self) -> int:
        return self.decode.count


class KeptTable:
    """``Budgets.kept`` as tensors: ``rows(prompt_lens) -> [L, R, Hkv]`` int32 (host),
    cached per (KV size, prompt length) and per batch of those (a decode step sees
    the same requests as the step before). ``rule`` makes the budgets of requests with
    their own KV size; ``budgets`` are the server's."""

    def __init__(self, budgets: Budgets, rule: BudgetRule | None = None):
        self.budgets = budgets
        self.rule = rule
        # (KV size, prompt length) -> its rows; remade, not reordered, past the bound
        self._by_len: BoundedCache[tuple, torch.Tensor] = BoundedCache(self.MAX_PROMPT_LENGTHS, restart=True)
        self._last: tuple[tuple, torch.Tensor] | None = None

    MAX_PROMPT_LENGTHS = 4096  # cached rows ([L, Hkv] each)

    def one(self, prompt_len: int, kv_size: int | str | None = None) -> torch.Tensor:
        if self.rule is None:
            kv_size = None
        t = self._by_len.get((kv_size, prompt_len))
        if t is None:
            budgets = self.budgets if kv_size is None else self.rule.budgets(kv_size)
            t = self._by_len.put((kv_size, prompt_len), torch.tensor(budgets.kept(prompt_len), dtype=torch.int32))
        return t

    def rows(self, prompt_lens: list[int], kv_sizes: tuple | None = None) -> torch.Tensor:
        key = (tuple(prompt_lens), kv_sizes)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if prompt_lens:
            sizes = kv_sizes or (None,) * len(prompt_lens)
            t = torch.stack([self.one(n, k) for n, k in zip(prompt_lens, sizes)], dim=1)
        else:
            t = torch.zeros(self.budgets.num_layers, 0, self.budgets.num_kv_heads, dtype=torch.int32)
        self._last = (key, t)
        return t


class WindowStash:
    """Window queries of a chunked prompt computed before its last chunk, per request
    and layer, kept until the last chunk scores with them (docs/kv_layout.md, "Scoring
    at the last chunk"). The planner drops the entries of requests that left."""

    def __init__(self):
        self._saved: dict[str, dict[int, list[torch.Tensor]]] = {}

    def save(self, key: str, layer: int, queries: torch.Tensor, first: bool) -> None:
        per_layer = self._saved.setdefault(key, {})
        if first:
            per_layer[layer] = []
        per_layer.setdefault(layer, []).append(queries.clone())

    def take(self, key: str, layer: int, count: int) -> torch.Tensor:
        parts = self._saved.get(key, {}).pop(layer, [])
        queries = torch.cat(parts) if parts else None
        if queries is None or queries.shape[0] != count:
            got = 0 if queries is None else queries.shape[0]
            raise RuntimeError(f"HeadKV: request {key} layer {layer}: {got} saved window queries, expected {count}.")
        if not self._saved[key]:
            del self._saved[key]
        return queries

    def keep_only(self, keys) -> None:
        for key in set(self._saved) - set(keys):
            del self._saved[key]

    def __len__(self) -> int:
        return len(self._saved)


def build_step_plan(inputs: StepInputs, kept_table: KeptTable, block_size: int,
                    device: torch.device | str, pin_memory: bool = False,
                    window_stash: WindowStash | None = None) -> StepPlan:
    """The plan of one step (host work, once per step for all layers). ``pin_memory``:
    stage the host-to-device copy in pinned memory (CUDA, where the platform allows)."""
    qsl = inputs.query_start_loc.long()
    n = qsl.numel() - 1
    qlen = qsl[1:] - qsl[:-1]
    total = inputs.seq_lens[:n].long()
    prompt = inputs.prompt_lens[:n].long()
    prompt = torch.where(prompt > 0, prompt, total)  # unknown (dummy rows): all prompt
    computed = total - qlen
    is_decode = (computed >= prompt) & (qlen == 1)
    is_prefill = (qlen > 0) & ~is_decode
    prompt_list = prompt.tolist()
    kept = kept_table.rows(prompt_list, inputs.kv_sizes)  # [L, R, H]
    uncompressed = total < prompt  # a prompt chunk: every head holds every token
    prompt_part = torch.minimum(prompt, total).to(torch.int32)
    generated = (total - prompt).clamp(min=0).to(torch.int32)
    lengths = torch.minimum(kept, prompt_part[None, :, None]) + generated[None, :, None]
    lengths = torch.where(uncompressed[None, :, None], total.to(torch.int32)[None, :, None], lengths)
    offsets = _row_offsets(inputs, kept, lengths, prompt, uncompressed, block_size)

    window = kept_table.budgets.window
    head_max = lengths.amax(dim=(0, 2)).tolist() if n else []  # [R] longest head over layers
    prefix_full = (kept >= prompt.to(torch.int32)[None, :, None]).all(dim=2)  # [L, R] every head keeps all
    qsl_list, total_list, computed_list = qsl.tolist(), total.tolist(), computed.tolist()
    keys = inputs.request_keys
    prefills = tuple(
        PrefillPlan(
            row=i, start=qsl_list[i], prompt_len=prompt_list[i], num_tokens=total_list[i],
            window=min(window, prompt_list[i]), max_len=int(head_max[i]),
            needs_scores=tuple((~prefix_full[:, i]).tolist()), computed=computed_list[i],
            key=keys[i] if keys is not None else "",
        )
        for i in is_prefill.nonzero().flatten().tolist()
    )
    decode_reqs = is_decode.nonzero().flatten()
    d_reqs = decode_reqs.tolist()
    decode_max = max((head_max[i] for i in d_reqs), default=0)
    max_pages = max(1, -(-max(head_max, default=0) // block_size))

    # Prompt attention: each prefill's prompt rows of the step as queries; as keys its
    # prompt so far (earlier chunks from the pages, packed before the step's rows).
    attending = [pf for pf in prefills if pf.prompt_queries > 0]
    spans = [(pf.start, pf.start + pf.prompt_queries) for pf in attending]
    prefill_tokens = torch.cat([torch.arange(a, b, dtype=torch.int32) for a, b in spans]) if spans \
        else torch.zeros(0, dtype=torch.int32)
    contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    q_lens = [pf.prompt_queries for pf in attending]
    k_lens = [pf.context + pf.prompt_queries for pf in attending]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)

    # One host-to-device copy for the step.
    parts = [kept.flatten(), lengths.flatten(), qsl[decode_reqs].int(), decode_reqs.int(), prefill_tokens, cu, cu_k,
             offsets.flatten()]
    host = torch.cat(parts)
    dev = torch.device(device)
    if dev.type == "cpu":
        staged = host
    elif pin_memory:
        staged = host.pin_memory().to(dev, non_blocking=True)
    else:
        staged = host.to(dev)
    kept_dev, lengths_dev, decode_tokens, decode_reqs_dev, prefill_tokens_dev, cu_dev, cu_k_dev, offsets_dev = \
        staged.split([t.numel() for t in parts])
    layout = RowLayout(
        kept=kept_dev.view(kept.shape), lengths=lengths_dev.view(kept.shape), offsets=offsets_dev.view(offsets.shape),
        kept_host=kept, lengths_host=lengths, offsets_host=offsets, has_offsets=bool(offsets.any()),
        max_pages=max_pages, prompt_lens=tuple(prompt_list), kv_sizes=inputs.kv_sizes or (None,) * n,
    )
    decode = DecodeRows(tokens=decode_tokens.long(), span=_span(qsl[decode_reqs].tolist()), reqs=decode_reqs_dev.long(),
                        reqs_host=decode_reqs, req_span=_span(d_reqs), max_len=int(decode_max))
    prompts = PackedPrompts(
        tokens=prefill_tokens_dev.long(), span=(spans[0][0], spans[-1][1]) if spans and contiguous else None,
        cu_seqlens_q=cu_dev, max_len_q=max(q_lens, default=0), cu_seqlens_k=cu_k_dev, max_len_k=max(k_lens, default=0),
        has_context=any(pf.context > 0 for pf in attending),
    )
    return StepPlan(num_actual_tokens=inputs.num_actual_tokens, block_size=block_size, layout=layout, decode=decode,
                    prefills=prefills, prompts=prompts, window_stash=window_stash)


def _span(rows: list[int]) -> tuple[int, int] | None:
    """Ascending ``rows`` as a range ``(first, last + 1)`` when they are contiguous."""
    return (rows[0], rows[-1] + 1) if rows and rows[-1] - rows[0] == len(rows) - 1 else None


def _row_offsets(inputs: StepInputs, kept: torch.Tensor, lengths: torch.Tensor, prompt: torch.Tensor,
                 uncompressed: torch.Tensor, block_size: int) -> torch.Tensor:
    """[L, R] int32 leading null entries of each row, checked against the scheduler's count.

    Pages a request needs (docs/kv_layout.md, "Scheduler count"): every head's pages while
    a chunked prompt is uncompressed, ``sum_h ceil(len_h / bs)`` once compressed. Rows of a
    prompt prefilled in chunks hold ``row_offset`` more entries in front (null once the
    scheduler has seen the last chunk computed): uncompressed prompt pages minus compressed."""
    num_layers, n, num_heads = kept.shape
    if inputs.row_counts is None:
        return torch.zeros(num_layers, n, dtype=torch.int32)
    held = inputs.row_counts[:, :n].long()
    need = ((lengths.long() + block_size - 1) // block_size).sum(dim=2)  # [L, R]
    offsets = held - need
    full = num_heads * ((prompt + block_size - 1) // block_size)  # [R] the prompt's uncompressed pages
    compressed = ((torch.minimum(kept.long(), prompt[None, :, None]) + block_size - 1) // block_size).sum(dim=2)
    ok = (offsets == 0) | ((offsets == full[None, :] - compressed) & ~uncompressed[None, :])
    if not bool(ok.all()):
        layer, row = (int(i) for i in (~ok).nonzero()[0])
        raise RuntimeError(
            f"HeadKV layer {layer}: scheduler allocated {held[layer].tolist()} head pages, "
            f"worker needs {need[layer].tolist()} (row {row}; a chunked prompt's row may hold "
            f"{int(full[row] - compressed[layer, row])} more in front)."
        )
    return offsets.to(torch.int32)
