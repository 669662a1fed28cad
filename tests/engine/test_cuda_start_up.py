"""vLLM's CUDA start-up decisions for HEADKV, checked on vLLM's own config code
without CUDA: the model runner (V1, chosen by vLLM itself), CUDA-graph mode
(piecewise around HeadKV attention), and the options HeadKV refuses before any
engine process starts."""

import logging

import pytest

from headkv_vllm.method.config import HeadKVConfigError


def make_config(model_dir, backend="headkv", headkv=None, **engine_args):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), dtype="float32", attention_backend=backend, max_model_len=2048,
                      additional_config={"headkv": headkv or {"policy": "snapkv"}}, **engine_args)
    return args.create_engine_config()


def test_model_runner_v2_is_not_chosen_for_headkv(model_dir, monkeypatch):
    """Where vLLM would pick Model Runner V2 (CUDA with Triton), it picks V1 for HEADKV,
    by its own rule, and says why; other backends keep V2."""
    import vllm.config.vllm as vllm_config_module

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)  # as on a CUDA node
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    headkv, stock = make_config(model_dir), make_config(model_dir, backend="TRITON_ATTN")
    assert any("HEADKV attention backend" in f for f in headkv._get_v2_model_runner_unsupported_features())
    assert headkv.use_v2_model_runner is False
    assert stock._get_v2_model_runner_unsupported_features() == []
    assert stock.use_v2_model_runner is True


def test_forcing_model_runner_v2_is_refused(model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    pattern = r"Model Runner V2 is selected \(VLLM_USE_V2_MODEL_RUNNER=1.*HeadKV runs on Model Runner V1.*Unset"
    with pytest.raises(ValueError, match=pattern):
        make_config(model_dir)


@pytest.mark.parametrize("option, value", [("tensor_parallel_size", 3), ("pipeline_parallel_size", 2)])
def test_model_parallelism_is_refused_with_the_option_named(model_dir, option, value):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ValueError, match=rf"{flag} {value}: HeadKV runs on one GPU per model replica.*Remove {flag}"):
        make_config(model_dir, **{option: value})


def test_speculative_decoding_is_refused(model_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    with pytest.raises(ValueError, match=r"--speculative-config: HeadKV does not support speculative decoding"):
        make_config(model_dir, speculative_config=spec)


def test_micro_batching_is_refused(model_dir):
    from headkv_vllm.engine.settings import apply_engine_settings
    from headkv_vllm.method.config import HeadKVConfig

    config = make_config(model_dir)
    config.parallel_config.enable_dbo = True  # the CPU platform turns it off; CUDA keeps it
    with pytest.raises(HeadKVConfigError, match=r"--enable-dbo / --ubatch-size: .*remove those options"):
        apply_engine_settings(config, HeadKVConfig.from_additional_config(config.additional_config),
                              logging.getLogger("test"))


def test_triton_route_on_cpu_needs_the_interpreter(model_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"'page_store' is 'block-table-triton'.*Set TRITON_INTERPRET=1"):
        make_config(model_dir, headkv={"policy": "snapkv", "page_store": "block-table-triton"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    make_config(model_dir, headkv={"policy": "snapkv", "page_store": "block-table-triton"})


def test_headkv_attention_stays_out_of_cuda_graphs():
    """The builder declares no CUDA-graph support, and vLLM's own resolution turns its
    CUDA default (FULL_AND_PIECEWISE) into piecewise graphs around the attention layers;
    an explicit FULL is refused by vLLM with the fix in the message."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
    from vllm.v1.attention.backend import AttentionCGSupport

    from headkv_vllm.engine.backend import HeadKVMetadataBuilder

    support = HeadKVMetadataBuilder.get_cudagraph_support(None, None)
    assert support == AttentionCGSupport.NEVER

    def cuda_compilation(mode):  # as VllmConfig sets it up on CUDA
        config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode)
        config.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
        return config

    default = cuda_compilation(CUDAGraphMode.FULL_AND_PIECEWISE)
    assert default.splitting_ops_contain_attention()
    assert default.resolve_cudagraph_mode_and_sizes(support, "HEADKV", max_num_reqs=8) == CUDAGraphMode.PIECEWISE
    with pytest.raises(ValueError, match="cudagraph_mode=PIECEWISE"):
        cuda_compilation(CUDAGraphMode.FULL).resolve_cudagraph_mode_and_sizes(support, "HEADKV", max_num_reqs=8)


@pytest.mark.slow
@pytest.mark.parametrize("page_store", ["auto", "block-table"])
def test_profiling_kv_cache_and_dummy_batches(model_dir, haystack_ids, page_store):
    """vLLM's GPU-runner start-up paths on the real engine (tests/support/gpu_runner_probe.py):
    the CUDA-graph memory profile's KV cache is built from head-page specs, HEADKV's
    builders plan vLLM's dummy batches (uniform decode, mixed, prefill) and write only
    into the null block, and after the real KV cache is set up again the engine
    generates exactly what it generated before. The block tables' bytes HeadKVWorker
    takes off the profiled KV-cache memory are what the runner allocated."""
    from support.engines import engine, run_engine_script

    spec = {"engine": engine(model_dir, policy="snapkv", kv_size=64, page_store=page_store),
            "prompts": [haystack_ids[100:300], haystack_ids[5000:5030]],
            "sampling": dict(temperature=0.0, max_tokens=6, ignore_eos=True)}
    out = run_engine_script("gpu_runner_probe.py", spec)
    assert out["profiling_specs"] == ["HeadKVSpec"]
    assert out["profiling_builders"] == ["HeadKVMetadataBuilder"]
    assert out["profiling_num_blocks"] == 8  # vLLM: min(max_num_seqs, largest graph size) pages
    assert out["dummy_plans"] == 3
    assert out["changed_blocks"] == [0]  # the dummy batches wrote, and only into the null block
    tables = out["block_table_bytes"]
    assert tables["counted"] == tables["allocated"] > 0
    assert out["after"] == out["before"] and all(len(t) == 6 for t in out["before"])
