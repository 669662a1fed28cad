# HeadKV on a GPU node: the official vLLM OpenAI server image of the pinned
# version, plus this plugin installed from its wheel. Build:  docker build -t headkv-vllm .
# Run:   docker run --gpus all -p 8000:8000 -e MODEL=<hf model or /models/dir> \
#          -e HEADKV_CONFIG='{}' headkv-vllm [extra vllm serve args]
ARG VLLM_VERSION=v0.32.0

# Build stage: the plugin's wheel (pure Python; the shipped score files in configs/ are
# package data, installed as headkv_vllm/configs). tests/engine/test_wheel_install.py builds the
# wheel from exactly these COPY lines.
FROM vllm/vllm-openai:${VLLM_VERSION} AS build
COPY setup.py README.md /opt/headkv-vllm/
COPY headkv_vllm /opt/headkv-vllm/headkv_vllm
COPY kernels /opt/headkv-vllm/kernels
COPY configs /opt/headkv-vllm/configs
RUN python3 -m pip wheel --no-cache-dir --no-deps -w /opt/headkv-dist /opt/headkv-vllm

FROM vllm/vllm-openai:${VLLM_VERSION}
COPY --from=build /opt/headkv-dist /opt/headkv-dist
# --no-deps: the image already holds the pinned vLLM and its torch.
RUN python3 -m pip install --no-cache-dir --no-deps /opt/headkv-dist/headkv_vllm-*.whl \
    && rm -rf /opt/headkv-dist

ENV MODEL=HuggingFaceTB/SmolLM2-135M-Instruct \
    HEADKV_CONFIG='{}'
EXPOSE 8000
ENTRYPOINT ["/bin/sh", "-c", "exec vllm serve \"$MODEL\" --attention-backend headkv --additional-config \"{\\\"headkv\\\": $HEADKV_CONFIG}\" \"$@\"", "headkv-serve"]
