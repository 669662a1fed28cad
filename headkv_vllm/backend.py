"""The HEADKV attention backend over per-head pages (docs/kv_layout.md).

- ``HeadKVBackend``: static declarations.
- ``HeadKVMetadataBuilder.build``: all host work of a step for one layer (each
  layer is its own KV-cache group): head lengths, page positions, slot tables.
- ``HeadKVImpl.forward``: prefill (full causal attention, then score, select and
  store each head's kept tokens) and decode (append, then attend over head pages).

The ops come from ``headkv_vllm.kernels``: Triton kernels on CUDA, their PyTorch
references on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headkv_vllm.kernels.paged_decode import paged_decode
from headkv_vllm.kernels.select_store import select_and_store
from headkv_vllm.kernels.window_scores import window_scores
from headkv_vllm.layout import page_positions
from headkv_vllm.vllm_compat import (
    BACKEND_NAME,
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    KVCacheLayout,
    MultipleOf,
    block_table_row_counts,
    get_current_vllm_config,
    logger,
    num_prompt_tokens,
)


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


@dataclass
class HeadKVMetadata:
    num_actual_tokens: int
    prefills: list[PrefillMeta]
    decode_tokens: torch.Tensor  # [D] rows of the batch that are decode tokens
    decode_slots: torch.Tensor  # [D, Hkv, Lmax]
    decode_lengths: torch.Tensor  # [D, Hkv] head lengths including the new token


class HeadKVMetadataBuilder(AttentionMetadataBuilder[HeadKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.spec = kv_cache_spec
        self.block_size = kv_cache_spec.block_size
        self.layer = kv_cache_spec.layer_index
        self.runner = None
        self._kept_cache: dict[int, torch.Tensor] = {}

    def bind_runner(self, runner) -> None:
        """The model runner holds the prompt lengths, which attention metadata lacks."""
        self.runner = runner

    def _kept(self, prompt_len: int) -> torch.Tensor:
        kept = self._kept_cache.get(prompt_len)
        if kept is None:
            kept = self._kept_cache[prompt_len] = torch.tensor(self.spec.kept(prompt_len), dtype=torch.long)
        return kept

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
        lmax = int(lengths.max()) if n else 0
        pos = page_positions(kept, bs, max(1, -(-lmax // bs)))  # [n, H, J]
        p = torch.arange(lmax)
        bt = cm.block_table_tensor[:n].cpu().long()
        row_pos = pos[:, :, p // bs].clamp(max=bt.shape[1] - 1)  # [n, H, Lmax]
        blocks = bt.gather(1, row_pos.reshape(n, -1)).view(row_pos.shape)
        slots = blocks * bs + p % bs

        prefills = []
        window = self.spec.budgets.window
        qsl_list = qsl.tolist()
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
            prefills.append(PrefillMeta(
                start=qsl_list[i], prompt_len=n_prompt, num_tokens=n_tok, window=w,
                needs_scores=bool((caps < n_prompt - w).any()), caps=caps.to(self.device),
                lengths=lengths[i].to(self.device), slots=slots[i, :, : int(lengths[i].max())].to(self.device),
            ))
        decode_rows = is_decode.nonzero().flatten()
        dev = self.device
        return HeadKVMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            prefills=prefills,
            decode_tokens=qsl[decode_rows].to(dev),
            decode_slots=slots[decode_rows].to(dev),
            decode_lengths=lengths[decode_rows].to(dev),
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
        from headkv_vllm.config import HeadKVConfig

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
        for pf in attn_metadata.prefills:
            self._prefill(pf, q, k, v, pages, out)
        if attn_metadata.decode_tokens.numel():
            rows = attn_metadata.decode_tokens
            slots, lengths = attn_metadata.decode_slots, attn_metadata.decode_lengths
            new_slot = slots.gather(2, (lengths - 1)[:, :, None])[:, :, 0]  # [D, Hkv]
            pages[new_slot // block_size, 0, new_slot % block_size] = k[rows].to(pages.dtype)
            pages[new_slot // block_size, 1, new_slot % block_size] = v[rows].to(pages.dtype)
            out[rows] = paged_decode(q[rows], pages, slots, lengths, self.scale).to(out.dtype)
        return output

    def _prefill(self, pf: PrefillMeta, q, k, v, pages, out) -> None:
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
        select_and_store(scores, kr, vr, pf.caps, pf.lengths, pf.slots, pages)
        if t > n:
            # Recomputed generated tokens (after preemption) see the compressed prompt,
            # exactly as they did when first decoded.
            g = torch.arange(1, t - n + 1, device=q.device)
            lengths = pf.lengths[None, :] - (t - n) + g[:, None]
            slots = pf.slots[None].expand(t - n, -1, -1)
            out[s + n : s + t] = paged_decode(qr[n:], pages, slots, lengths, self.scale).to(out.dtype)


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
