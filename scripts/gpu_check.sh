#!/usr/bin/env bash
# The prepared GPU check: on one CUDA device, without vLLM and without a network,
#   1. the vLLM-free tests listed in TEST_FILES, one pytest process per file, in
#      parallel: the kernel tests compile the Triton kernels for the device and compare
#      them with their PyTorch references (tests/kernels/test_kernels_*.py);
#      tests/gpu/test_step_harness.py runs HeadKV steps (prefills, decodes, a recomputed
#      request) through the compute core at the full shapes (--gpu-shapes full: small
#      and Llama-3-8B attention, bf16/fp32/fp16) and checks them against the fp32 CPU
#      reference and an independent oracle, the forward under CUDA's sync guard;
#      tests/gpu/inside_gpu_check.py checks the tests' imports;
#   2. scripts/bench_decode_step.py times decode steps through the compute core;
#   3. scripts/bench_kernels.py --quick.
# Writes results/gpu_check/gpu_check_<device>_<date>.json (and copies it with the
# logs to $OUT when OUT is set). Exit status 0 when every part passed.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from anywhere
#   bash scripts/gpu_check.sh --cpu-dry-run   # without a GPU: the script itself, on
#                                             # the CPU (Triton interpreter, the tiny
#                                             # step shape, bench_decode_step.py --quick,
#                                             # no kernel bench)
# Environment: PYTHON (default python3; Python >= 3.11), OUT, GPU_CHECK_TESTS (test
# files or file::test ids, to narrow the run), GPU_CHECK_RESULTS (default
# results/gpu_check). The whole run stays under 8 minutes (GPU_CHECK_DEADLINE_S,
# default 450). headkv_vllm need not be installed: it is imported from this tree.
# GPU_CHECK_COMMIT: the commit the tree was copied from, recorded in the JSON (a copy
# without .git has none of its own), e.g. from the checkout that sends it:
#   GPU_CHECK_COMMIT=<output of git rev-parse HEAD there> bash scripts/gpu_check.sh
set -u -o pipefail

usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; }

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python3}
COMMAND="bash scripts/gpu_check.sh${*:+ $*}"
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-450}
RESULTS=${GPU_CHECK_RESULTS:-results/gpu_check}
TEST_FILES=${GPU_CHECK_TESTS:-"tests/kernels/test_kernels_decode.py tests/kernels/test_kernels_select_store.py \
tests/kernels/test_kernels_window_scores.py tests/kernels/test_kernels_bench.py tests/core/test_torch_ops.py tests/core/test_step_plan.py tests/core/test_chunked_prefill_core.py \
tests/gpu/test_step_harness.py tests/gpu/inside_gpu_check.py"}
START=$(date +%s)

if ! "$PY" -c 'import torch, triton, pytest' 2>/dev/null; then
  echo "gpu_check.sh: $PY cannot import torch, triton and pytest (set PYTHON to the interpreter that has them)" >&2
  exit 2
fi
HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [[ $HAS_CUDA != 1 && $DRY_RUN == 0 ]]; then
  echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False). This check compiles and runs" >&2
  echo "the Triton kernels on a GPU. To try the script itself on the CPU: bash scripts/gpu_check.sh --cpu-dry-run" >&2
  exit 3
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGS=$RESULTS/logs/$STAMP
mkdir -p "$WORK/pytest" "$LOGS"

# headkv_vllm from this tree without installing it: a package folder assembled from
# links as setup.py installs it (headkv_vllm/*, kernels/ as headkv_vllm.kernels, configs/
# as headkv_vllm.configs), first on sys.path, and vLLM blocked so that nothing here can
# use it. PYTHONSAFEPATH=1: `python -c`, `python -m pytest` and `python scripts/...` do
# not put the current folder (this tree's root, whose headkv_vllm/ has neither kernels
# nor configs) or the script's folder before it (pytest still puts tests/ on sys.path
# for conftest.py; no headkv_vllm there).
PKG=$WORK/path/headkv_vllm
mkdir -p "$PKG" "$WORK/path/vllm"
for entry in headkv_vllm/*; do
  [[ $(basename "$entry") == __pycache__ ]] || ln -s "$PWD/$entry" "$PKG/"
done
ln -s "$PWD/kernels" "$PKG/kernels"
ln -s "$PWD/configs" "$PKG/configs"
echo 'raise ImportError("vLLM is not used by scripts/gpu_check.sh")' >"$WORK/path/vllm/__init__.py"
export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1
export GPU_CHECK_PACKAGE=$PKG  # tests/gpu/inside_gpu_check.py checks the tests' imports against it
if [[ $DRY_RUN == 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the test files share the cores
  GPU_SHAPES=tiny BENCH_ARGS=(--quick --reps 3)
else
  unset TRITON_INTERPRET  # compile the kernels for the device
  GPU_SHAPES=full BENCH_ARGS=()
fi
# The compute core, the kernels and the score files import from the assembled package.
if ! "$PY" -c '
import os, sys
from pathlib import Path
assert sys.version_info >= (3, 11), f"Python {sys.version.split()[0]}: PYTHONSAFEPATH needs Python >= 3.11"
import headkv_vllm.core.attention, headkv_vllm.core.page_store, headkv_vllm.kernels.select_store
from headkv_vllm.method import scores
pkg = Path(os.environ["GPU_CHECK_PACKAGE"])
for name, where in [("headkv_vllm", pkg), ("headkv_vllm.kernels", pkg / "kernels"),
                    ("headkv_vllm.configs", pkg / "configs"), ("headkv_vllm.core.attention", pkg / "core")]:
    got = Path(sys.modules[name].__file__).parent
    assert got == where, f"{name} imported from {got}, not from {where}"
assert scores.available_score_files(), "no score files in headkv_vllm.configs"
try:
    import vllm
except ImportError:
    pass
else:
    raise AssertionError("vllm imported")
print("headkv_vllm (kernels and configs included) from the assembled package; vllm blocked")
' >"$LOGS/imports.log" 2>&1; then
  echo "gpu_check.sh: the compute core does not import from this tree without vLLM:" >&2
  cat "$LOGS/imports.log" >&2
  exit 2
fi

left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
run_timed() {  # run_timed <timeout s> <time file> <rc file> <log> command...
  local limit=$1 time_file=$2 rc_file=$3 log=$4
  shift 4
  local t0 rc
  t0=$(date +%s.%N)
  if command -v timeout >/dev/null; then
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  else
    "$@" >"$log" 2>&1
  fi
  rc=$?
  echo "$t0 $(date +%s.%N)" >"$time_file"
  echo "$rc" >"$rc_file"
}

# Seconds kept for the benchmarks after the tests (the kernel bench runs on CUDA only).
STEP_BENCH_RESERVE=60
BENCH_RESERVE=$((DRY_RUN == 1 ? 0 : 75))

# 1. Tests, one process per file (Triton compiles on several cores at once). No globbing:
# a test id may hold brackets (file::test[param]).
echo "gpu_check: tests ($(echo $TEST_FILES | wc -w) files in parallel)"
PYTEST_LIMIT=$(($(left) - STEP_BENCH_RESERVE - BENCH_RESERVE - 20))
t0=$(date +%s.%N)
set -f
for file in $TEST_FILES; do
  name=$(sed "s#/#.#g" <<<"${file%%::*}"); name=${name%.py}  # tests.core.test_x
  run_timed "$PYTEST_LIMIT" "$WORK/pytest/$name.time" "$WORK/pytest/$name.rc" "$LOGS/pytest_$name.log" \
    "$PY" -m pytest -q -p no:cacheprovider --gpu-shapes "$GPU_SHAPES" "$file" --junitxml="$WORK/pytest/$name.xml" &
done
set +f
wait
echo "$t0 $(date +%s.%N)" >"$WORK/pytest.time"

# 2. Decode steps through the compute core, timed (the dry run: a smoke run on the CPU).
echo "gpu_check: decode step bench"
STEP_BENCH_LIMIT=$(($(left) - BENCH_RESERVE - 10))
((STEP_BENCH_LIMIT < 30)) && STEP_BENCH_LIMIT=30
run_timed "$STEP_BENCH_LIMIT" "$WORK/step_bench.time" "$WORK/step_bench.rc" "$LOGS/bench_decode_step.log" \
  "$PY" scripts/bench_decode_step.py "${BENCH_ARGS[@]}" --out "$WORK/step_bench.json"

# 3. The kernel benchmark's smoke run.
if [[ $DRY_RUN == 1 ]]; then
  echo skipped >"$WORK/bench.rc"
else
  echo "gpu_check: kernel bench --quick"
  BENCH_LIMIT=$(($(left) - 10))
  ((BENCH_LIMIT < 30)) && BENCH_LIMIT=30
  run_timed "$BENCH_LIMIT" "$WORK/bench.time" "$WORK/bench.rc" "$LOGS/bench_kernels_quick.log" \
    "$PY" scripts/bench_kernels.py --quick --out "$WORK/bench.json"
fi
echo "$START $(date +%s)" >"$WORK/total.time"

REPORT_ARGS=(--work "$WORK" --logs "$LOGS" --command "$COMMAND" --stamp "$STAMP" --out-dir "$RESULTS")
[[ $DRY_RUN == 1 ]] && REPORT_ARGS+=(--dry-run)
"$PY" scripts/gpu_check_report.py "${REPORT_ARGS[@]}"
