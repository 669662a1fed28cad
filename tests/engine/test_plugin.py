"""Plugin registration: entry point, idempotence, spawned processes, CLI parsing."""

import importlib.metadata
import multiprocessing as mp
import pickle
import subprocess
import sys

import pytest

from headkv_vllm.engine.version import check_vllm_version


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [ep.value for ep in eps if ep.name == "headkv"] == ["headkv_vllm:register"]


def test_register_is_idempotent():
    import headkv_vllm
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    headkv_vllm.register()
    member = AttentionBackendEnum["HEADKV"]
    wrapped = type(current_platform).check_and_update_config
    for _ in range(3):
        headkv_vllm.register()
    assert AttentionBackendEnum["HEADKV"] is member
    assert type(current_platform).check_and_update_config == wrapped
    assert list(AttentionBackendEnum.__members__).count("HEADKV") == 1
    assert member.get_path() == "headkv_vllm.engine.backend.HeadKVBackend"
    assert member.get_class().get_name() == "HEADKV"


def _child_unpickle(payload, queue):
    # A spawned process that has not loaded any plugin, like vLLM's engine core.
    member = pickle.loads(payload)
    queue.put((member.name, member.get_path()))


def _child_load_plugins(queue):
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    load_general_plugins()
    load_general_plugins()
    queue.put(AttentionBackendEnum["HEADKV"].get_class().get_name())


def _run_spawned(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    return result


def test_member_unpickles_in_spawned_process_without_plugins():
    import headkv_vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    headkv_vllm.register()
    payload = pickle.dumps(AttentionBackendEnum["HEADKV"])
    assert _run_spawned(_child_unpickle, payload) == ("HEADKV", "headkv_vllm.engine.backend.HeadKVBackend")


def test_plugin_loads_in_spawned_process():
    assert _run_spawned(_child_load_plugins) == "HEADKV"


def test_attention_backend_flag_parses(model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    ns = parser.parse_args(["--model", str(model_dir), "--attention-backend", "headkv", "--dtype", "float32",
                            "--additional-config", '{"headkv": {"policy": "snapkv"}}'])
    config = AsyncEngineArgs.from_cli_args(ns).create_engine_config()
    assert config.attention_config.backend.name == "HEADKV"


def test_cpu_platform_routes_headkv_to_our_backend():
    import headkv_vllm
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    headkv_vllm.register()
    assert current_platform.is_cpu()
    path = current_platform.get_attn_backend_cls(AttentionBackendEnum["HEADKV"], None)
    assert path == "headkv_vllm.engine.backend.HeadKVBackend"


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_other_vllm_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=r"written against vLLM 0\.32\.x but vLLM .* is installed"):
        check_vllm_version(version)


def test_pinned_version_is_accepted():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")


def test_another_vllm_release_is_refused_before_vllm_is_imported():
    """vLLM's entry point on another release: the readable refusal, and not one of vLLM's
    modules imported before it (their imports are what may fail on another release)."""
    code = """
import importlib.metadata, sys
real = importlib.metadata.version
importlib.metadata.version = lambda name: "0.99.0" if name == "vllm" else real(name)
import headkv_vllm
try:
    headkv_vllm.register()
except RuntimeError as e:
    print("REFUSED", e)
print("VLLM_MODULES", sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "REFUSED headkv-vllm is written against vLLM 0.32.x but vLLM 0.99.0 is installed" in out, out
    assert "VLLM_MODULES []" in out, out


def test_config_error_is_found_where_it_was_raised_from_not_while_handled():
    from headkv_vllm.engine.plugin import config_error
    from headkv_vllm.method.config import HeadKVConfigError

    try:
        try:
            raise HeadKVConfigError("bad key")
        except HeadKVConfigError as e:
            raise ValueError("wrapped") from e
    except ValueError as wrapped:
        assert str(config_error(wrapped)) == "bad key"
    try:
        try:
            raise HeadKVConfigError("bad key")
        except HeadKVConfigError:
            raise RuntimeError("an unrelated crash while handling it")
    except RuntimeError as crash:
        assert config_error(crash) is None  # its own traceback is printed, not the paragraph
