#!/usr/bin/env bash
# The staged check of HEADKV on a real GPU node, in the Docker image (docker build
# -t headkv-vllm .). Each stage runs `headkv-vllm node-check` in the image: stock
# vLLM (TRITON_ATTN), then HEADKV with every head's budget >= the prompt (its greedy
# tokens must equal stock's), then HEADKV compressed (every request must complete),
# one server at a time. The stages risk CUDA start-up paths in order:
#   1. eager     --enforce-eager, fixed KV-cache size: the CUDA route itself
#                (Triton kernels, flash prefill, step plan on the device);
#   2. graphs    vLLM's default compilation and piecewise CUDA graphs around HEADKV
#                attention, async scheduling, fixed KV-cache size;
#   3. profiled  graphs plus vLLM's own memory profiling (--gpu-memory-utilization),
#                whose CUDA-graph memory profile builds a KV cache of its own.
# Stops at the first stage that fails. Results: $RESULTS/node_check_<stage>.json and the
# servers' logs (RESULTS default results/node_check).
#
#   bash scripts/gpu_node_check.sh [MODEL] [extra node-check args, e.g. --dtype float16]
# Environment: IMAGE (default headkv-vllm), HF_CACHE (mounted as the image's Hugging
# Face cache, default ~/.cache/huggingface), STAGES (default "eager graphs profiled").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${1:-HuggingFaceTB/SmolLM2-135M-Instruct}
shift $(( $# > 0 ? 1 : 0 ))
IMAGE=${IMAGE:-headkv-vllm}
HF_CACHE=${HF_CACHE:-$HOME/.cache/huggingface}
RESULTS=${RESULTS:-results/node_check}
mkdir -p "$RESULTS" "$HF_CACHE"
RESULTS=$(cd "$RESULTS" && pwd)

for stage in ${STAGES:-eager graphs profiled}; do
  echo "== stage $stage =="
  if ! docker run --rm --gpus all --ipc=host \
      -v "$RESULTS:/results" -v "$HF_CACHE:/root/.cache/huggingface" \
      --entrypoint headkv-vllm "$IMAGE" \
      node-check --stage "$stage" --model "$MODEL" --out /results "$@"; then
    echo "stage $stage FAILED: see $RESULTS/node_check_${stage}.json and the logs beside it" >&2
    exit 1
  fi
done
echo "All stages passed: HEADKV starts on this node in eager mode, with CUDA graphs and with vLLM's"
echo "memory profiling, gives stock vLLM's greedy tokens when nothing is evicted, and serves compressed."
