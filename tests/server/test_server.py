"""The real OpenAI-compatible server with the HEADKV backend, queried by the openai
client: a chat answer, and continuous batching with preemption and cancellations
leaving the page pool as it found it."""

import asyncio
import random
import re
import time

import pytest
import requests

from support.engines import SMOL

BLOCK = 16
MAX_LEN = 1024
# The smallest pool vLLM accepts (one uncompressed max-length request) plus a little:
# 64 requests do not fit at once, so the server queues and preempts.
POOL_PAGES = SMOL.num_layers * SMOL.num_kv_heads * (MAX_LEN // BLOCK) + 200
HEAD_PAGE_BYTES = 2 * BLOCK * SMOL.head_dim * 4


@pytest.fixture(scope="module")
def server(model_dir, skewed_scores, tmp_path_factory):
    from headkv_vllm.tools.common.serve_process import ServerConfig, VllmServer

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


@pytest.mark.slow
def test_per_request_kv_sizes_and_bad_values(server, model_dir, haystack_ids, skewed_scores):
    """``vllm_xargs`` ``headkv_kv_size``: a bad value is an HTTP 400 that names the field
    and the allowed values, and reaches no engine; concurrent requests with their own
    sizes keep the tokens of their own budgets (the server's log line per request)."""
    from openai import AsyncOpenAI

    from headkv_vllm.engine.settings import resolve_budget_rule
    from headkv_vllm.method.config import HeadKVConfig

    base, log_path = server
    model = str(model_dir)
    before = metrics(base)
    allowed = 'above the server\'s window (8) and at most 2147483647 (average tokens kept per KV head), or "full"'
    for xargs, says in [
        ({"headkv_kv_size": "lots"}, allowed), ({"headkv_kv_size": 8}, allowed), ({"headkv_kv_size": 12.5}, allowed),
        ({"headkv_kv_size": [64]}, allowed), ({"headkv_kv_size": 2**31}, allowed),
        ({"headkv_kv_sise": 64}, "not a HeadKV per-request setting; the known one is 'headkv_kv_size'"),
    ]:
        r = requests.post(f"{base}/v1/completions", timeout=60, json={
            "model": model, "prompt": "Hello", "max_tokens": 4, "vllm_xargs": xargs})
        assert r.status_code == 400, (xargs, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert f"vllm_xargs.{next(iter(xargs))}" in message and says in message, message
    after = metrics(base)
    for counter in ("vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert after[counter] == before[counter], counter  # nothing reached the engine

    sizes = {"own-64": 64, "own-full": "full", "own-server": None}
    tokens = {}
    prompts = {name: haystack_ids[70000 + i * 1000 : 70000 + i * 1000 + 800] for i, name in enumerate(sizes)}

    async def run():
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600) as client:
            async def one(name):
                xargs = {} if sizes[name] is None else {"vllm_xargs": {"headkv_kv_size": sizes[name]}}
                r = await client.completions.create(model=model, prompt=prompts[name], max_tokens=8, temperature=0.0,
                                                    logprobs=1, extra_body={"request_id": name, **xargs})
                tokens[name] = r.choices[0].logprobs.tokens
                return r.usage.completion_tokens
            return await asyncio.gather(*(one(name) for name in sizes))

    asyncio.run(_one_more(base, model))  # every gauge set at least once
    wait_idle(base)
    idle = headkv_metrics(base)
    pages_seen = []

    async def watch():
        while True:
            pages_seen.append((await asyncio.to_thread(headkv_metrics, base))["vllm:headkv_head_pages_in_use"])
            await asyncio.sleep(0.2)

    async def run_and_watch():
        watcher = asyncio.create_task(watch())
        done = await run()
        watcher.cancel()
        return done

    assert asyncio.run(run_and_watch()) == [8] * len(sizes)
    rule, _ = resolve_budget_rule(HeadKVConfig.from_mapping({"kv_size": 128, "scores": skewed_scores}), SMOL)
    log = log_path.read_text()
    means = {}
    for name, kv_size in sizes.items():
        kept = rule.budgets(kv_size).kept(len(prompts[name]))
        means[name] = sum(map(sum, kept)) / (SMOL.num_layers * SMOL.num_kv_heads)
        line = re.search(rf"HeadKV request \S*{name}\S*: prompt (\d+) tokens, kept ([0-9.]+) per KV head", log)
        assert line and int(line[1]) == len(prompts[name]), name
        assert float(line[2]) == round(means[name], 1), (name, line[2], means[name])
    assert means["own-64"] < means["own-server"] < means["own-full"] == 800.0

    # HeadKV's metrics on /metrics moved with these three requests, and the pages came back
    wait_idle(base)
    asyncio.run(_one_more(base, model))  # aborts above free pages outside a step: refresh the gauges
    now = headkv_metrics(base)
    assert max(pages_seen) > 0 and now["vllm:headkv_head_pages_in_use"] == 0.0
    assert now["vllm:headkv_head_pages_free"] == idle["vllm:headkv_head_pages_free"] == POOL_PAGES
    delta = {k: now[k] - idle[k] for k in now}
    hello = delta["vllm:headkv_prompt_tokens_total"] - 3 * 800  # the one more request's prompt
    assert 0 < hello < 10
    assert delta['vllm:headkv_requests_total{compressed="true"}'] == 2
    assert delta['vllm:headkv_requests_total{compressed="false"}'] == 2  # "full", and the short one
    assert abs(delta["vllm:headkv_kept_tokens_total"] - sum(means.values()) - hello) < 1e-6
    assert delta["vllm:headkv_kept_share_count"] == 4

    # the "full" request, run next to compressed ones, gives stock vLLM's greedy tokens
    from headkv_vllm.tools.common.serve_process import ServerConfig, VllmServer

    stock_config = ServerConfig(model=model, max_model_len=MAX_LEN, kv_cache_memory_bytes=2**30)
    with VllmServer(stock_config, log_path.with_name("stock_serve.log")) as stock:
        r = requests.post(f"{stock.base_url}/v1/completions", timeout=300, json={
            "model": model, "prompt": prompts["own-full"], "max_tokens": 8, "temperature": 0.0, "logprobs": 1})
    assert r.json()["choices"][0]["logprobs"]["tokens"] == tokens["own-full"]


def headkv_metrics(base: str) -> dict[str, float]:
    """HeadKV's series on /metrics, by name and the labels other than model and engine."""
    out: dict[str, float] = {}
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        m = re.match(r"^(vllm:headkv_[a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+)$", line)
        if m:
            labels = [l for l in (m[2] or "").split(",") if l and not l.startswith(("model_name=", "engine="))]
            out[m[1] + (("{" + ",".join(labels) + "}") if labels else "")] = float(m[3])
    return out
