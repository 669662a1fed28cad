"""HeadKV head-level KV-cache compression as an out-of-tree vLLM plugin."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (see ``plugin.register``)."""
    # Imported when vLLM calls it: importing the package must not load vLLM, and the
    # version is checked before the plugin imports vLLM's internals.
    from headkv_vllm.engine.version import check_vllm_version, installed_vllm_version

    check_vllm_version(installed_vllm_version())
    from headkv_vllm.engine.plugin import register as _register  # after the check, on purpose

    _register()
