"""The real OpenAI-compatible server with the HEADKV backend, queried by the openai client."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm_serve.log"
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [
        str(vllm_bin), "serve", str(model_dir), "--attention-backend", "headkv",
        "--dtype", "float32", "--gpu-memory-utilization", "0.3", "--enforce-eager",
        "--max-model-len", "2048", "--additional-config", json.dumps({"headkv": {"policy": "snapkv", "kv_size": 64}}), "--host", "127.0.0.1", "--port", str(port),
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not become healthy in 300 s:\n{log_path.read_text()[-4000:]}")
        yield base, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_chat_completion_through_openai_client(server, model_dir):
    from openai import OpenAI

    base, log_path = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=str(model_dir),
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0.0,
    )
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.usage.completion_tokens > 0
    assert "Using HEADKV backend." in log_path.read_text()
