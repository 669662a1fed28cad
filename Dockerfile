# HeadKV on a GPU node: the official vLLM OpenAI server image of the pinned
# version, plus this plugin. Build:  docker build -t headkv-vllm .
# Run:   docker run --gpus all -p 8000:8000 -e MODEL=<hf model or /models/dir> \
#          -e HEADKV_CONFIG='{}' headkv-vllm [extra vllm serve args]
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}

COPY setup.py README.md /opt/headkv-vllm/
COPY headkv_vllm /opt/headkv-vllm/headkv_vllm
COPY kernels /opt/headkv-vllm/kernels
COPY configs /opt/headkv-vllm/configs
# --no-deps: the image already holds the pinned vLLM and its torch.
RUN python3 -m pip install --no-cache-dir --no-deps /opt/headkv-vllm

ENV MODEL=HuggingFaceTB/SmolLM2-135M-Instruct \
    HEADKV_CONFIG='{}'
EXPOSE 8000
ENTRYPOINT ["/bin/sh", "-c", "exec vllm serve \"$MODEL\" --attention-backend headkv --additional-config \"{\\\"headkv\\\": $HEADKV_CONFIG}\" \"$@\"", "headkv-serve"]
