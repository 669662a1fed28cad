"""The real OpenAI-compatible server with the HEADKV backend, queried by the openai
client: a chat answer, and continuous batching with preemption and cancellations
leaving the page pool as it found it."""

import asyncio
import random
import re
import time

import pytest
import requests

from conftest import SMOL

BLOCK = 16
MAX_LEN = 1024
# The smallest pool vLLM accepts (one uncompressed max-length request) plus a little:
# 64 requests do not fit at once, so the server queues and preempts.
POOL_PAGES = SMOL.num_layers * SMOL.num_kv_heads * (MAX_LEN // BLOCK) + 200
HEAD_PAGE_BYTES = 2 * BLOCK * SMOL.head_dim * 4


@pytest.fixture(scope="module")
def server(model_dir, skewed_scores, tmp_path_factory):
    from headkv_vllm.tools.serve_process import ServerConfig, VllmServer

    config = ServerConfig(
        model=str(model_dir), headkv={"policy": "headkv", "kv_size": 128, "scores": skewed_scores},
        max_model_len=MAX_LEN, kv_cache_memory_bytes=(POOL_PAGES + 1) * HEAD_PAGE_BYTES, max_num_seqs=64,
    )
    log_path = tmp_path_factory.mktemp("server") / "vllm_serve.log"
    with VllmServer(config, log_path) as srv:
        yield srv.base_url, log_path


def metrics(base: str) -> dict[str, float]:
    """vLLM's Prometheus gauges and counters, summed over label sets."""
    out: dict[str, float] = {}
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        m = re.match(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


def wait_idle(base: str, timeout: float = 120) -> dict[str, float]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(base)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            return m
        time.sleep(0.5)
    raise AssertionError(f"server still busy after {timeout} s: {m}")


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
    log = log_path.read_text()
    assert "Using HEADKV backend." in log
    assert re.search(r"HeadKV: policy=headkv kv_size=128 .* pool=\d+ head pages", log)


@pytest.mark.slow
def test_64_mixed_requests_preemption_and_cancellation_free_every_page(server, model_dir, haystack_ids):
    from openai import AsyncOpenAI

    base, log_path = server
    model = str(model_dir)
    rng = random.Random(0)
    assert metrics(base)["vllm:kv_cache_usage_perc"] == 0.0

    async def complete(client, prompt, max_tokens):
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0.0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, r.choices[0].finish_reason

    async def cancelled(client, prompt, request_id, after_tokens):
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=20, stream=True,
                                                 extra_body={"ignore_eos": True, "request_id": request_id})
        received = 0
        if after_tokens == 0:
            await asyncio.sleep(0.3)  # the prompt is being prefilled (one step, > 1 s on the CPU)
        else:
            async for _ in stream:
                received += 1
                if received == after_tokens:
                    break
        await stream.close()
        return received

    usage_seen = []

    async def peak_usage():
        while True:
            usage_seen.append((await asyncio.to_thread(metrics, base))["vllm:kv_cache_usage_perc"])
            await asyncio.sleep(0.5)

    async def batch():
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600) as client:
            jobs = []
            for _ in range(64):
                n, start = rng.randint(20, 900), rng.randint(0, 20000)
                jobs.append((haystack_ids[start : start + n], rng.randint(8, 64)))
            poll = asyncio.create_task(peak_usage())
            results = await asyncio.gather(*(complete(client, p, m) for p, m in jobs))
            poll.cancel()
            assert results == [(m, "length") for _, m in jobs]
            # vLLM's own KV usage metric counts head pages: the small pool fills up.
            assert usage_seen and max(usage_seen) > 0.8, usage_seen[-5:]
            before_cancel = wait_idle(base)
            # Cancel mid-prefill (a long prompt, closed while its prefill runs) and
            # mid-decode (closed after a few tokens), one at a time on an idle server.
            # vLLM's counters show each was aborted: no completion counted, and far
            # fewer than its 20 tokens generated.
            for i in range(3):
                for kind, start, n, after in (("prefill", 30000, 1000, 0), ("decode", 40000, 900, 3)):
                    m0 = metrics(base)
                    await cancelled(client, haystack_ids[start + i * 2000 : start + n + i * 2000], f"cancel-{kind}-{i}", after)
                    m1 = wait_idle(base)
                    assert m1["vllm:request_success_total"] == m0["vllm:request_success_total"], kind
                    assert m1["vllm:generation_tokens_total"] - m0["vllm:generation_tokens_total"] <= after + 4, kind
            # ... and while others run.
            survivors = [complete(client, haystack_ids[s : s + 900], 32) for s in range(50000, 58000, 1000)]
            mixed = [cancelled(client, haystack_ids[s : s + 900], f"cancel-busy-{s}", s % 3) for s in range(60000, 68000, 1000)]
            done = await asyncio.gather(*survivors, *mixed)
            assert done[: len(survivors)] == [(32, "length")] * len(survivors)
            return before_cancel

    before_cancel = asyncio.run(batch())
    assert before_cancel["vllm:num_preemptions_total"] > 0, "the small cache should have forced preemption"
    assert before_cancel["vllm:kv_cache_usage_perc"] == 0.0

    # Aborts free pages outside an engine step; one more request refreshes the gauges.
    asyncio.run(_one_more(base, model))
    after = wait_idle(base)
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    log = log_path.read_text()
    for i in range(3):
        # the requests cancelled "mid-prefill" did reach their prefill step
        assert re.search(rf"HeadKV request \S*cancel-prefill-{i}\S*: prompt", log), f"cancel-prefill-{i} never prefilled"


async def _one_more(base, model):
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="unused") as client:
        await client.completions.create(model=model, prompt="Hello", max_tokens=4)
