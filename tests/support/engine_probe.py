"""Runs a real ``vllm.LLM`` with the engine core in this process and records, after
every engine step, what the scheduler holds: running / waiting requests, free
pages of the pool, and each running request's pages per KV-cache group.

spec: {"engine": {LLM kwargs}, "prompts": [[token ids]], "sampling": {SamplingParams kwargs},
       "extra_args": [dict | None per prompt] (optional: SamplingParams.extra_args, e.g. headkv_kv_size),
       "async_scheduling": bool (optional: on, as on CUDA),
       "squeeze": ["mid_prefill" | "decode", ...] (optional: memory pressure, see Squeeze)}
result (printed as ``ENGINE_PROBE_RESULT {json}``):
  {"async_scheduling": bool, "scheduler": class name, "num_blocks": int, "free_at_start": int, "free_at_end": int, "block_size": int,
   "steps": [{"running": int, "waiting": int, "free": int,
              "requests": [{"id", "prompt_len", "computed", "pages": [per group], "nulls": [per group], "preemptions"}]}],
   "preemptions": int, "token_ids": {request id: [...]},
   "plan_builds": [per step: step plans HEADKV's worker built in the step] (HEADKV only),
   "kept": {request id: [per layer [per KV head]] tokens kept, from the plan of its compressing step} (HEADKV only),
   "squeezes": [{"phase", "step", "pages", "released_at"}]}
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler lives in this process


def force_async_scheduling() -> None:
    """Async scheduling, vLLM's default on CUDA, which the CPU platform turns off:
    turned back on after the platform's (and HeadKV's) config checks."""
    from vllm.platforms import current_platform

    from headkv_vllm.engine.plugin import register

    register()  # HeadKV's own config hook first
    cls = type(current_platform)
    checks = cls.check_and_update_config.__func__

    def check_and_update_config(c, vllm_config):
        checks(c, vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    cls.check_and_update_config = classmethod(check_and_update_config)


def leading_nulls(blocks) -> int:
    """Null entries at the front of a row (a chunked prompt's, once compressed)."""
    n = 0
    while n < len(blocks) and blocks[n].is_null:
        n += 1
    return n


class Squeeze:
    """Memory pressure at a chosen moment: when the last running request (the one
    vLLM's FCFS scheduler preempts first) is in the phase named, every free page of
    the pool is taken, as if other requests held them; they go back right after the
    step in which the scheduler preempted. vLLM's own preemption path does the rest.

    phases: "mid_prefill" (the last running request has some, not all, of its prompt
    computed: a prompt in chunks) and "decode" (every running request is past its prompt)."""

    def __init__(self, pool, phases: list[str]):
        self.pool, self.phases, self.held, self.log = pool, list(phases), None, []

    def after_step(self, step: int, running, preemptions: int) -> None:
        if self.held is not None:
            if preemptions > self.held[1]:
                self.pool.free_blocks(self.held[0])
                self.log[-1]["released_at"], self.held = step, None
            return
        if not self.phases or not running:
            return
        last = running[-1]
        phase = self.phases[0]
        if phase == "mid_prefill":
            ready = 0 < last.num_computed_tokens < last.num_prompt_tokens
        else:
            ready = all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)
        if ready and self.pool.get_num_free_blocks():
            self.phases.pop(0)
            blocks = self.pool.get_new_blocks(self.pool.get_num_free_blocks())
            self.held = (blocks, preemptions)
            self.log.append({"phase": phase, "step": step, "pages": len(blocks), "released_at": None})

    def release(self) -> None:
        if self.held is not None:
            self.pool.free_blocks(self.held[0])
            self.held = None


def main() -> None:
    spec = json.loads(sys.stdin.read())
    if spec.get("async_scheduling"):
        force_async_scheduling()
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["engine"])
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kv = scheduler.kv_cache_manager
    pool = kv.block_pool
    managers = kv.coordinator.single_type_managers
    free_at_start = pool.get_num_free_blocks()
    worker = engine.engine_core.engine_core.model_executor.driver_worker.worker
    planner = getattr(worker, "step_planner", None)
    plan_builds = []

    extra = spec.get("extra_args") or [None] * len(spec["prompts"])
    for i, prompt in enumerate(spec["prompts"]):
        params = SamplingParams(**spec["sampling"], extra_args=extra[i])
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    kept = {}

    steps, token_ids, preempted = [], {}, {}
    squeeze = Squeeze(pool, spec.get("squeeze", []))
    while engine.has_unfinished_requests():
        builds_before = planner.builds if planner else 0
        for out in engine.step():
            if out.finished:
                token_ids[out.request_id] = list(out.outputs[0].token_ids)
        for req in list(scheduler.running) + list(scheduler.waiting):
            preempted[req.request_id] = req.num_preemptions
        if planner:
            plan_builds.append(planner.builds - builds_before)
            if planner.builds > builds_before:
                ids = worker.model_runner.input_batch.req_ids
                for pf in planner._plan.prefills:
                    if pf.compresses:
                        kept[ids[pf.row].rsplit("-", 1)[0]] = planner._plan.layout.kept_host[:, pf.row].tolist()
        steps.append({
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "free": pool.get_num_free_blocks(),
            "requests": [
                {
                    "id": req.request_id.rsplit("-", 1)[0],  # vLLM appends a random suffix
                    "prompt_len": req.num_prompt_tokens,
                    "computed": req.num_computed_tokens,
                    "preemptions": req.num_preemptions,
                    "pages": [len(m.req_to_blocks.get(req.request_id, ())) for m in managers],
                    "nulls": [leading_nulls(m.req_to_blocks.get(req.request_id, ())) for m in managers],
                }
                for req in scheduler.running
            ],
        })
        squeeze.after_step(len(steps), scheduler.running, sum(preempted.values()))
    squeeze.release()
    result = {
        "async_scheduling": llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
        "scheduler": type(scheduler).__name__,
        "num_blocks": pool.num_gpu_blocks,
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "free_at_start": free_at_start,
        "free_at_end": pool.get_num_free_blocks(),
        "steps": steps,
        "preemptions": sum(preempted.values()),
        "token_ids": token_ids,
        "squeezes": squeeze.log,
    }
    if planner:
        result["plan_builds"] = plan_builds
        result["kept"] = kept
    print("ENGINE_PROBE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
