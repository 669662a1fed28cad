"""Runs vLLM's GPU-runner start-up paths that need no CUDA on a real HEADKV engine
(the engine core in this process; the CPU runner is vLLM's GPU runner minus CUDA):

1. generate (the reference outputs);
2. the KV cache dropped (the runner as before start-up's KV-cache set-up), then
   the CUDA-graph memory profile's KV cache: ``_init_minimal_kv_cache_for_profiling``,
   built from the runner's specs, as ``profile_cudagraph_memory`` builds it;
3. dummy batches over it with attention metadata built (uniform decode, mixed
   prefill + decode, prefill), as graph capture and kernel warm-up run them;
4. the profiling cache dropped and the real KV cache set up again, as vLLM does
   after profiling; generate again.

spec: {"engine": {LLM kwargs}, "prompts": [[token ids]], "sampling": {...}}
result (``GPU_RUNNER_PROBE_RESULT {json}``): {"before", "after": token ids per prompt,
  "block_table_bytes": {"allocated": the runner's device tables, "counted": what
  HeadKVWorker takes off the profiled KV-cache memory},
  "profiling_specs": [spec class names], "profiling_builders": [builder class names],
  "profiling_num_blocks": int, "dummy_plans": int, "changed_blocks": [block ids the
  dummy batches wrote]}
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker lives in this process


def block_table_device_bytes(model_runner) -> int:
    """Bytes of the runner's block tables on the device, all KV-cache groups."""
    tables = model_runner.input_batch.block_table.block_tables
    return sum(t.block_table.gpu.numel() * t.block_table.gpu.element_size() for t in tables)


def init_profiling_kv_cache(model_runner) -> None:
    """What the CUDA-graph memory profile builds first: a minimal KV cache from the
    runner's specs (``GPUModelRunner.profile_cudagraph_memory``)."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(model_runner.vllm_config):
        model_runner._init_minimal_kv_cache_for_profiling()


def dummy_run(model_runner, num_tokens: int, uniform_decode: bool = False, mixed: bool = False) -> None:
    """A dummy batch as vLLM's warm-ups and graph captures run it, with attention metadata
    built (``force_attention``: vLLM does it for full CUDA graphs and some kernel warm-ups,
    neither of which reaches HEADKV, whose builder declares no graph support)."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(model_runner.vllm_config):
        model_runner._dummy_run(num_tokens, force_attention=True, uniform_decode=uniform_decode,
                                create_mixed_batch=mixed, skip_eplb=True, is_profile=True)


def generate(llm, prompts, sampling):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(**sampling), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from vllm import LLM

    from headkv_vllm.engine.vllm_access import metadata_builders

    llm = LLM(**spec["engine"])
    before = generate(llm, spec["prompts"], spec["sampling"])
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    runner = worker.model_runner
    real_config = runner.kv_cache_config
    from headkv_vllm.engine.kv_spec import block_table_bytes

    tables = {"allocated": block_table_device_bytes(runner),
              "counted": block_table_bytes(runner.get_kv_cache_spec(), runner.vllm_config)}
    runner._cleanup_profiling_kv_cache()  # back to the state before any KV cache, where vLLM profiles

    # On CUDA vLLM sets the largest graph size (default 2 x max_num_seqs, at most 512);
    # without graphs it is None. The minimal cache has that many pages.
    runner.compilation_config.max_cudagraph_capture_size = 2 * runner.max_num_reqs
    init_profiling_kv_cache(runner)
    groups = runner.kv_cache_config.kv_cache_groups
    builders = list(metadata_builders(runner))
    pool = runner.kv_caches[0]  # every layer's view of the one pool
    snapshot = pool.clone()
    for kwargs in (dict(num_tokens=4, uniform_decode=True), dict(num_tokens=16, mixed=True), dict(num_tokens=32)):
        dummy_run(runner, **kwargs)
    changed = (pool != snapshot).flatten(1).any(dim=1).nonzero().flatten().tolist()
    plans = sum(b.planner.builds for b in builders[:1] if b.planner is not None)
    result = {
        "block_table_bytes": tables,
        "profiling_specs": sorted({type(g.kv_cache_spec).__name__ for g in groups}),
        "profiling_builders": sorted({type(b).__name__ for b in builders}),
        "profiling_num_blocks": runner.kv_cache_config.num_blocks,
        "dummy_plans": plans,
        "changed_blocks": changed,
    }

    runner._cleanup_profiling_kv_cache()
    worker.initialize_from_config(real_config)
    result.update(before=before, after=generate(llm, spec["prompts"], spec["sampling"]))
    print("GPU_RUNNER_PROBE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
