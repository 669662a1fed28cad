"""The requests of ``headkv-vllm stress``: a fixed-seed mix of prompt lengths, output
lengths and per-request KV sizes, client disconnects, and malformed requests.

Each :class:`Job` is one HTTP request and says what a correct server answers:
``complete`` and ``chat`` run to ``max_tokens`` (EOS ignored), ``disconnect`` jobs are
closed by the client before their first token (``after_tokens == 0``: waiting or in
prefill) or after a few tokens (mid-decode), ``malformed`` jobs must get a 4xx answer.
"""

from __future__ import annotations

import dataclasses
import random

KINDS = ("complete", "chat", "disconnect", "malformed")
# Per-request KV sizes drawn for well-formed requests; None: no vllm_xargs (the server's).
KV_SIZE_CHOICES = (None, None, 32, 64, 256, 1024, "full")
# Prompt lengths: short, medium and long buckets (tokens), chosen with these weights.
LENGTH_BUCKETS = ((16, 128, 0.4), (128, 768, 0.4), (768, 1500, 0.2))


@dataclasses.dataclass(frozen=True)
class Mix:
    """Shares of the job kinds (they need not sum to 1; they are weights)."""

    complete: float = 0.55
    chat: float = 0.15
    disconnect: float = 0.2
    malformed: float = 0.1

    def weights(self) -> list[float]:
        return [self.complete, self.chat, self.disconnect, self.malformed]


@dataclasses.dataclass
class Job:
    index: int
    kind: str
    path: str  # /v1/completions or /v1/chat/completions
    body: dict | None  # None: ``raw`` is sent as the body
    raw: bytes | None = None
    stream: bool = False
    max_tokens: int = 0
    kv_size: int | str | None = None
    after_tokens: int = 0  # disconnect: close after this many tokens (0: before the first, after ``delay_s``)
    delay_s: float = 0.0
    malformed: str | None = None  # what is wrong with it
    field: str | None = None  # the field a 400 answer must name (per-request HeadKV settings)

    @property
    def request_id(self) -> str:
        return f"stress-{self.index}-{self.kind}"


def prompt_length(rng: random.Random, max_prompt: int) -> int:
    lo, hi, _ = rng.choices(LENGTH_BUCKETS, weights=[w for *_, w in LENGTH_BUCKETS])[0]
    return rng.randint(min(lo, max_prompt), min(hi, max_prompt))


def malformed_cases(model: str, prompt: list[int], max_model_len: int, vocab_size: int, window: int) -> list[tuple]:
    """(what is wrong, path, body or raw bytes, field a 400 must name or None)."""
    ok = {"model": model, "prompt": prompt, "max_tokens": 4}
    xargs = lambda **kv: {**ok, "vllm_xargs": kv}
    return [
        ("headkv_kv_size not a number", "/v1/completions", xargs(headkv_kv_size="lots"), "vllm_xargs.headkv_kv_size"),
        ("headkv_kv_size at the window", "/v1/completions", xargs(headkv_kv_size=window), "vllm_xargs.headkv_kv_size"),
        ("headkv_kv_size a fraction", "/v1/completions", xargs(headkv_kv_size=100.5), "vllm_xargs.headkv_kv_size"),
        ("unknown headkv_ key", "/v1/completions", xargs(headkv_beta=2), "vllm_xargs.headkv_beta"),
        ("prompt longer than max_model_len", "/v1/completions", {**ok, "prompt": [11] * (max_model_len + 8)}, None),
        ("negative max_tokens", "/v1/completions", {**ok, "max_tokens": -3}, None),
        ("token id outside the vocabulary", "/v1/completions", {**ok, "prompt": prompt[:8] + [vocab_size + 7]}, None),
        ("unknown model", "/v1/completions", {**ok, "model": "no-such-model"}, None),
        ("body is not JSON", "/v1/completions", b'{"model": "x", "prompt": [1, 2', None),
        ("chat without messages", "/v1/chat/completions", {"model": model, "max_tokens": 4}, None),
        ("temperature not a number", "/v1/completions", {**ok, "temperature": "hot"}, None),
    ]


def make_jobs(n: int, seed: int, *, model: str, haystack_ids: list[int], haystack_text: str, max_model_len: int,
              vocab_size: int, window: int, mix: Mix = Mix(), max_output: int = 64, first_index: int = 0,
              kv_sizes: bool = True) -> list[Job]:
    """``n`` jobs from ``seed`` (the same seed and arguments give the same jobs).
    ``kv_sizes`` False: no per-request KV sizes (stock vLLM), the rest unchanged."""
    rng = random.Random(seed)
    max_prompt = min(LENGTH_BUCKETS[-1][1], max_model_len - max(max_output, 8) - 8)
    jobs = []
    for i in range(first_index, first_index + n):
        kind = rng.choices(KINDS, weights=mix.weights())[0]
        length = prompt_length(rng, max_prompt)
        start = rng.randrange(0, len(haystack_ids) - length)
        prompt = haystack_ids[start : start + length]
        max_tokens = rng.randint(1, max_output)
        kv_size = rng.choice(KV_SIZE_CHOICES)  # drawn either way, so the jobs are otherwise the same
        if isinstance(kv_size, int) and kv_size <= window:  # a calibrated window may exceed the small sizes
            kv_size = 2 * window
        if not kv_sizes:
            kv_size = None
        common = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        if kv_size is not None:
            common["vllm_xargs"] = {"headkv_kv_size": kv_size}
        if kind == "malformed":
            what, path, body, field = rng.choice(malformed_cases(model, prompt, max_model_len, vocab_size, window))
            raw = body if isinstance(body, bytes) else None
            jobs.append(Job(i, kind, path, None if raw else body, raw=raw, malformed=what, field=field))
        elif kind == "chat":
            chars = rng.randint(60, min(3000, 2 * max_prompt))  # ~4 characters a token: at most ~half the prompt room
            at = rng.randrange(0, len(haystack_text) - chars)
            text = haystack_text[at : at + chars] + "\n\nSummarize the text above in one sentence."
            stream = rng.random() < 0.5
            body = {**common, "messages": [{"role": "user", "content": text}], "stream": stream}
            jobs.append(Job(i, kind, "/v1/chat/completions", body, stream=stream, max_tokens=max_tokens, kv_size=kv_size))
        else:
            stream = kind == "disconnect" or rng.random() < 0.5
            after, delay = 0, 0.0
            if kind == "disconnect":
                # Half close before the first token (long prompts: their prefill takes a while),
                # half after 1 .. max_tokens-1 tokens.
                max_tokens = max(max_tokens, 8)
                if rng.random() < 0.5:
                    delay = rng.uniform(0.05, 4.0)
                else:
                    after = rng.randint(1, max_tokens - 1)
            body = {**common, "max_tokens": max_tokens, "prompt": prompt, "stream": stream}
            jobs.append(Job(i, kind, "/v1/completions", body, stream=stream, max_tokens=max_tokens, kv_size=kv_size,
                            after_tokens=after, delay_s=delay))
        if jobs[-1].body is not None and kind != "malformed":
            jobs[-1].body["request_id"] = jobs[-1].request_id
            if stream:
                # usage in every chunk: a busy server merges tokens into one chunk
                jobs[-1].body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return jobs
