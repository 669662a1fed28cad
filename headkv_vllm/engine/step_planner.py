"""The worker's one ``StepPlanner``: builds the step plan once per step for all layers.

vLLM calls every layer's metadata builder in turn with the same step inputs (a
shallow copy of one ``CommonAttentionMetadata`` per KV-cache group); the first call
of a step builds the plan, the others reuse it. A step is recognised by the
identity of its ``query_start_loc_cpu`` tensor: vLLM 0.32's model runner slices a
fresh view of its persistent buffer per ``_build_attention_metadata`` call and
shallow-copies one ``CommonAttentionMetadata`` per group, so every group of a step
shares it and no two steps do; the planner keeps a reference to it, so the identity
cannot be reused while the plan is cached. (Micro-batching would split it per
micro-batch; HeadKV refuses micro-batching at start-up.)
"""

from __future__ import annotations

import torch

from headkv_vllm.core.plan import KeptTable, StepInputs, StepPlan, WindowStash, build_step_plan
from headkv_vllm.engine.vllm_access import (
    CommonAttentionMetadata,
    block_table_row_counts,
    head_kv_group_layers,
    live_request_ids,
    logger,
    num_prompt_tokens,
    pin_memory_available,
    request_extra_args,
    request_ids,
    seq_lens_cpu,
)
from headkv_vllm.method.budgets import BudgetRule, Budgets
from headkv_vllm.method.request_settings import request_kv_size


class StepPlanner:
    def __init__(self, budgets: Budgets, block_size: int, device: torch.device, rule: BudgetRule | None = None):
        self.budgets = budgets
        self.block_size = block_size
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" and pin_memory_available()
        self.kept = KeptTable(budgets, rule)
        self.window_stash = WindowStash()
        self.runner = None
        self.builds = 0  # plans built so far (tests count them)
        self._key: torch.Tensor | None = None
        self._plan: StepPlan | None = None
        self._group_layers: list[tuple[int, int]] | None = None  # (group id, layer index)

    def bind_runner(self, runner) -> None:
        """The model runner holds the prompt lengths and request ids, which attention
        metadata lacks."""
        self.runner = runner
        self._group_layers = None

    def plan(self, cm: CommonAttentionMetadata) -> StepPlan:
        key = cm.query_start_loc_cpu
        if self._plan is not None and self._key is key:
            return self._plan
        n = cm.num_reqs
        total = seq_lens_cpu(cm)[:n]
        real = self.runner is not None and n > 0 and len(request_ids(self.runner)) >= n
        if real:
            prompt = num_prompt_tokens(self.runner, n)
        else:
            # A dummy batch (vLLM's dummy runs with attention metadata): no requests,
            # made-up lengths, zeroed block tables. Planned as fresh prompts of its query
            # tokens, so every write lands in block 0, vLLM's never-allocated null block.
            total = key[1 : n + 1] - key[:n]
            prompt = total
        ids = request_ids(self.runner)[:n] if real else None
        kv_sizes = None
        if real:
            # requests that asked for their own KV size (vllm_xargs headkv_kv_size)
            kv_sizes = tuple(request_kv_size(e) for e in request_extra_args(self.runner, ids))
            kv_sizes = kv_sizes if any(k is not None for k in kv_sizes) else None
        inputs = StepInputs(query_start_loc=key[: n + 1], seq_lens=total, prompt_lens=prompt,
                            num_actual_tokens=cm.num_actual_tokens,
                            row_counts=self._row_counts(n) if real else None,
                            request_keys=tuple(ids) if real else None, kv_sizes=kv_sizes)
        plan = build_step_plan(inputs, self.kept, self.block_size, self.device, self.pin_memory, self.window_stash)
        if real:
            # saved window queries live until their last chunk, or until the request finishes
            self.window_stash.keep_only(live_request_ids(self.runner))
            self._log_prefills(plan)
        self._key, self._plan = key, plan
        self.builds += 1
        return plan

    def _row_counts(self, n: int) -> torch.Tensor:
        """[L, R] block-table entries of every layer's rows (the plan checks them against
        the layout, so the scheduler's count and the worker's rows agree every step)."""
        if self._group_layers is None:
            self._group_layers = head_kv_group_layers(self.runner)
        counts = torch.zeros(self.budgets.num_layers, n, dtype=torch.long)
        for group, layer in self._group_layers:
            counts[layer] = torch.as_tensor(block_table_row_counts(self.runner, group)[:n], dtype=torch.long)
        return counts

    def _log_prefills(self, plan: StepPlan) -> None:
        ids = request_ids(self.runner)
        for pf in plan.prefills:
            if not pf.compresses:
                continue
            kept = plan.layout.kept_host[:, pf.row].float().mean().item()
            logger.info(
                "HeadKV request %s: prompt %d tokens, kept %.1f per KV head on average over all layers (%.1f%%).",
                ids[pf.row], pf.prompt_len, kept, 100.0 * kept / pf.prompt_len,
            )
