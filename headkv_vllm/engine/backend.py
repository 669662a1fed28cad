"""The HEADKV attention backend over per-head pages (docs/kv_layout.md).

- ``HeadKVBackend``: static declarations.
- ``HeadKVMetadataBuilder.build``: all host work of a step for one layer (each
  layer is its own KV-cache group): head lengths, page positions, slot tables.
- ``HeadKVImpl.forward``: prefill (full causal attention, then score, select and
  store each head's kept tokens) and decode (append, then attend over head pages).

On CUDA the ops are ``headkv_vllm.kernels``' Triton kernels. On the CPU, scoring and
selection are their PyTorch references, and head pages are written and read by
vLLM's own CPU cache and attention ops, one sequence per (token, KV head)
(``vllm_compat`` section 6): decode reads the kept tokens in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headkv_vllm.kernels.paged_decode import paged_decode
from headkv_vllm.kernels.select_store import select_and_store, select_sources
from headkv_vllm.kernels.window_scores import window_scores
from headkv_vllm.method.layout import page_positions
from headkv_vllm.engine.compat import (
    BACKEND_NAME,
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    KVCacheLayout,
    MultipleOf,
    block_table_row_counts,
    cpu_attention_isa,
    cpu_attention_schedule,
    cpu_head_attention,
    cpu_store_tokens,
    get_current_vllm_config,
    logger,
    num_prompt_tokens,
)


@dataclass
class CpuHeadAttention:
    """Inputs of vLLM's CPU attention op with one sequence per (query token, KV head)."""

    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, J] int32 head pages of each sequence, in head order
    schedule: torch.Tensor  # the op's work split


@dataclass
class HeadQueries:
    """Query tokens that attend, per KV head, over that head's pages: decode tokens,
    and the generated tokens of a preempted request recomputed with its prompt."""

    rows: torch.Tensor  # [B] batch rows of the tokens
    lengths: torch.Tensor  # [B, Hkv] tokens each head holds for the query (its own included)
    slots: torch.Tensor | None  # [B, Hkv, Lmax] slot tables (Triton path)
    cpu: CpuHeadAttention | None  # CPU path


@dataclass
class PrefillMeta:
    """One request prefilled in this step: tokens [start, start + num_tokens) of the batch.

    num_tokens > prompt_len only when a preempted request is recomputed
    (prompt + its generated tokens).
    """

    start: int
    prompt_len: int
    num_tokens: int
    window: int  # min(window, prompt_len)
    needs_scores: bool  # False when every head keeps the whole prompt
    caps: torch.Tensor  # [Hkv] prefix tokens kept per head
    lengths: torch.Tensor  # [Hkv] head lengths after this step
    slots: torch.Tensor  # [Hkv, Lmax]
    recomputed: HeadQueries | None  # the generated tokens of a recomputed request


@dataclass
class HeadKVMetadata:
    num_actual_tokens: int
    prefills: list[PrefillMeta]
    decodes: HeadQueries | None
    decode_slots: torch.Tensor | None  # [D, Hkv] slot of each decode token in each head
    cpu_isa: str | None  # vLLM CPU attention ISA (the CPU path), None on CUDA


def _slot_table(head_blocks: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[..., Hkv, J] head pages -> [..., Hkv, length] slot of each head position."""
    p = torch.arange(length)
    return head_blocks[..., p // block_size] * block_size + p % block_size


class HeadKVMetadataBuilder(AttentionMetadataBuilder[HeadKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.spec = kv_cache_spec
        self.block_size = kv_cache_spec.block_size
        self.layer = kv_cache_spec.layer_index
        self.runner = None
        self._kept_cache: dict[int, torch.Tensor] = {}
        model = vllm_config.model_config
        self.dtype = model.dtype
        self.queries_per_kv = model.get_num_attention_heads(vllm_config.parallel_config) // kv_cache_spec.num_kv_heads
        on_cpu = torch.device(device).type == "cpu"
        self.cpu_isa = cpu_attention_isa(self.dtype, self.block_size, kv_cache_spec.head_size) if on_cpu else None

    def bind_runner(self, runner) -> None:
        """The model runner holds the prompt lengths, which attention metadata lacks."""
        self.runner = runner

    def _kept(self, prompt_len: int) -> torch.Tensor:
        kept = self._kept_cache.get(prompt_len)
        if kept is None:
            kept = self._kept_cache[prompt_len] = torch.tensor(self.spec.kept(prompt_len), dtype=torch.long)
        return kept

    def _head_queries(self, rows: torch.Tensor, lengths: torch.Tensor, head_blocks: torch.Tensor) -> HeadQueries:
        """rows [B], lengths [B, Hkv], head_blocks [B, Hkv, J] (host tensors)."""
        dev = self.device
        if self.cpu_isa is None:
            slots = _slot_table(head_blocks, int(lengths.max()), self.block_size)
            return HeadQueries(rows.to(dev), lengths.to(dev), slots.to(dev), None)
        seqs = lengths.numel()
        seq_lens = lengths.flatten().to(torch.int32)
        qsl = torch.arange(seqs + 1, dtype=torch.int32)
        cpu = CpuHeadAttention(
            query_start_loc=qsl, seq_lens=seq_lens,
            block_tables=head_blocks.reshape(seqs, -1).to(torch.int32),
            schedule=cpu_attention_schedule(seq_lens, qsl, self.queries_per_kv, self.spec.head_size,
                                            self.dtype, self.cpu_isa),
        )
        return HeadQueries(rows, lengths, None, cpu)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> HeadKVMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: n + 1].long()
        qlen = qsl[1:] - qsl[:-1]
        total = cm.seq_lens.cpu()[:n].long()
        real = self.runner is not None and self.runner.input_batch.num_reqs >= n and n > 0
        prompt = num_prompt_tokens(self.runner, n).long() if real else total.clone()
        prompt = torch.where(prompt > 0, prompt, total)  # dummy rows: all prompt
        computed = total - qlen
        is_prefill = (computed == 0) & (qlen > 0)
        is_decode = (computed >= prompt) & (qlen == 1)
        bad = (qlen > 0) & ~is_prefill & ~is_decode
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise RuntimeError(
                f"HeadKV: request row {i} computes {int(qlen[i])} tokens after {int(computed[i])} "
                f"(prompt {int(prompt[i])}): only whole-prompt prefills and 1-token decodes are supported "
                "(chunked prefill and speculative decoding are off under HeadKV)."
            )
        prompt_list, total_list = prompt.tolist(), total.tolist()
        kept = torch.stack([self._kept(p) for p in prompt_list]) if n else torch.zeros(0, 1, dtype=torch.long)
        prompt_part = torch.minimum(prompt, total)[:, None]
        lengths = torch.minimum(kept, prompt_part) + (total - prompt).clamp(min=0)[:, None]  # [n, H]

        bs = self.block_size
        pages_per_head = (lengths + bs - 1) // bs
        if real:
            held = block_table_row_counts(self.runner, self.spec_group_id())[:n]
            need = pages_per_head.sum(1)
            if not torch.equal(torch.as_tensor(held, dtype=torch.long), need):
                raise RuntimeError(
                    f"HeadKV layer {self.layer}: scheduler allocated {list(held)} head pages, worker needs {need.tolist()}."
                )
        num_pages = max(1, int(pages_per_head.max())) if n else 1
        bt = cm.block_table_tensor[:n].cpu().long()
        pos = page_positions(kept, bs, num_pages).clamp(max=bt.shape[1] - 1)  # [n, H, J]
        head_blocks = bt.gather(1, pos.reshape(n, -1)).view(pos.shape)  # [n, H, J]

        prefills = []
        window = self.spec.budgets.window
        qsl_list = qsl.tolist()
        dev = self.device
        for i in is_prefill.nonzero().flatten().tolist():
            n_prompt, n_tok = prompt_list[i], total_list[i]
            w = min(window, n_prompt)
            caps = torch.minimum(kept[i], torch.tensor(n_prompt)) - w
            if self.layer == 0 and real:
                model_kept = self.spec.budgets.kept(n_prompt)
                mean_kept = sum(map(sum, model_kept)) / (len(model_kept) * len(model_kept[0]))
                logger.info(
                    "HeadKV request %s: prompt %d tokens, kept %.1f per KV head on average over all layers (%.1f%%).",
                    self.runner.input_batch.req_ids[i], n_prompt, mean_kept, 100.0 * mean_kept / n_prompt,
                )
            recomputed = None
            if n_tok > n_prompt:
                g = n_tok - n_prompt
                rows = torch.arange(qsl_list[i] + n_prompt, qsl_list[i] + n_tok)
                step = torch.arange(1, g + 1)[:, None]
                recomputed = self._head_queries(rows, lengths[i][None] - g + step, head_blocks[i].expand(g, -1, -1))
            prefills.append(PrefillMeta(
                start=qsl_list[i], prompt_len=n_prompt, num_tokens=n_tok, window=w,
                needs_scores=bool((caps < n_prompt - w).any()), caps=caps.to(dev), lengths=lengths[i].to(dev),
                slots=_slot_table(head_blocks[i], int(lengths[i].max()), bs).to(dev), recomputed=recomputed,
            ))
        decode_rows = is_decode.nonzero().flatten()
        decodes = decode_slots = None
        if decode_rows.numel():
            d_lengths, d_blocks = lengths[decode_rows], head_blocks[decode_rows]
            last = (d_lengths - 1)[:, :, None]
            decode_slots = (d_blocks.gather(2, last // bs) * bs + last % bs)[:, :, 0].to(dev)
            decodes = self._head_queries(qsl[decode_rows], d_lengths, d_blocks)
        return HeadKVMetadata(
            num_actual_tokens=cm.num_actual_tokens, prefills=prefills, decodes=decodes,
            decode_slots=decode_slots, cpu_isa=self.cpu_isa,
        )

    def spec_group_id(self) -> int:
        if not hasattr(self, "_group_id"):
            groups = self.runner.kv_cache_config.kv_cache_groups
            self._group_id = next(i for i, g in enumerate(groups) if g.layer_names == self.layer_names)
        return self._group_id


class HeadKVImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs):
        unsupported = {
            "alibi_slopes": alibi_slopes, "sliding_window": sliding_window, "logits_soft_cap": logits_soft_cap,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name, "sinks": sinks,
        }
        used = [k for k, v in unsupported.items() if v]
        if used or attn_type != AttentionType.DECODER or kv_cache_dtype not in ("auto", None):
            raise NotImplementedError(
                f"HEADKV supports plain decoder self-attention with an unquantised KV cache; "
                f"this layer uses {used or attn_type or kv_cache_dtype}. Use another --attention-backend."
            )
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        self.group = num_heads // num_kv_heads
        config = get_current_vllm_config().additional_config
        from headkv_vllm.method.config import HeadKVConfig

        self.pool_kernel = HeadKVConfig.from_additional_config(config).pool_kernel

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("HEADKV does not fuse output quantisation.")
        if attn_metadata is None:  # profiling run
            return output
        d = self.head_size
        num_blocks, _, block_size, _ = kv_cache.shape
        pages = kv_cache.view(num_blocks, 2, block_size, d)
        out = output.view(-1, self.num_heads, d)
        q = query.view(-1, self.num_heads, d)
        k = key.view(-1, self.num_kv_heads, d)
        v = value.view(-1, self.num_kv_heads, d)
        isa = attn_metadata.cpu_isa
        for pf in attn_metadata.prefills:
            self._prefill(pf, q, k, v, pages, out, isa)
        dq = attn_metadata.decodes
        if dq is not None:
            slots = attn_metadata.decode_slots
            if isa is not None:
                cpu_store_tokens(k[dq.rows].reshape(-1, d), v[dq.rows].reshape(-1, d), pages, slots.flatten(), isa)
            else:
                pages[slots // block_size, 0, slots % block_size] = k[dq.rows].to(pages.dtype)
                pages[slots // block_size, 1, slots % block_size] = v[dq.rows].to(pages.dtype)
            out[dq.rows] = self._attend(dq, q[dq.rows], pages).to(out.dtype)
        return output

    def _attend(self, hq: HeadQueries, q: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """[B, Hq, d] attention of each query token over its KV heads' pages."""
        if hq.cpu is None:
            return paged_decode(q, pages, hq.slots, hq.lengths, self.scale)
        c = hq.cpu
        grouped = q.reshape(-1, self.group, self.head_size)  # query heads of KV head h are contiguous
        result = torch.empty_like(grouped)
        cpu_head_attention(grouped, pages, result, c.query_start_loc, c.seq_lens, c.block_tables, c.schedule, self.scale)
        return result.view(q.shape)

    def _prefill(self, pf: PrefillMeta, q, k, v, pages, out, isa: str | None) -> None:
        s, n, t, w = pf.start, pf.prompt_len, pf.num_tokens, pf.window
        qr, kr, vr = q[s : s + t], k[s : s + t], v[s : s + t]
        # Full causal attention over the prompt (prefill itself is not compressed).
        attn = F.scaled_dot_product_attention(
            qr[:n].transpose(0, 1)[None], kr[:n].transpose(0, 1)[None], vr[:n].transpose(0, 1)[None],
            is_causal=True, scale=self.scale, enable_gqa=True,
        )
        out[s : s + n] = attn[0].transpose(0, 1).to(out.dtype)
        if pf.needs_scores:
            scores = window_scores(qr[n - w : n], kr[:n], self.scale, self.pool_kernel)
        else:
            scores = torch.zeros(self.num_kv_heads, n - w, device=q.device)
        if isa is None:
            select_and_store(scores, kr, vr, pf.caps, pf.lengths, pf.slots, pages)
        else:
            src, valid = select_sources(scores, pf.caps, pf.lengths, pf.slots.shape[1])
            head = torch.arange(self.num_kv_heads)[:, None].expand_as(src)[valid]
            cpu_store_tokens(kr[src[valid], head], vr[src[valid], head], pages, pf.slots[valid], isa)
        if pf.recomputed is not None:
            # Recomputed generated tokens (after preemption) see the compressed prompt,
            # exactly as they did when first decoded.
            out[s + n : s + t] = self._attend(pf.recomputed, qr[n:], pages).to(out.dtype)


class HeadKVBackend(AttentionBackend):
    forward_includes_kv_cache_update = True  # the impl writes each head's kept tokens itself
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[HeadKVImpl]:
        return HeadKVImpl

    @staticmethod
    def get_builder_cls() -> type[HeadKVMetadataBuilder]:
        return HeadKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)
