"""An interpreter that sees this environment's packages but not the editable install
of headkv_vllm: a fresh venv whose site-packages lists this environment's
site-packages as plain path lines in a .pth file. Such lines add the folders without
running the .pth files in them, so the editable install's finder (which maps
headkv_vllm, headkv_vllm.kernels and headkv_vllm.configs onto the source tree) is
not installed."""

import subprocess
import sys
import sysconfig
from pathlib import Path


def make_bare_venv(venv: Path) -> tuple[Path, Path]:
    """Create the venv at ``venv``; returns (its python, its site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    base = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_base_environment.pth").write_text("".join(f"{p}\n" for p in base))
    return python, site
