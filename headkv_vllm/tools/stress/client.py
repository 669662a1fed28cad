"""One ``headkv-vllm stress`` job sent over HTTP, and what became of it.

Outcomes: ``completed`` (a well-formed request answered in full: ``max_tokens``
tokens, finish reason "length"), ``cancelled`` (the client closed the stream on
purpose), ``rejected`` (a malformed request answered 4xx, naming the field where the
job says which), ``failed`` (anything else: a 5xx, a wrong answer, no answer).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from headkv_vllm.tools.stress.workload import Job


async def run_job(client: httpx.AsyncClient, base_url: str, job: Job) -> dict:
    out = {"index": job.index, "kind": job.kind, "kv_size": job.kv_size, "sent": time.monotonic(), "status": None,
           "tokens": 0, "outcome": "failed", "detail": None}
    if job.malformed:
        out["malformed"] = job.malformed
    try:
        if job.stream:
            await _streamed(client, base_url, job, out)
        else:
            await _whole(client, base_url, job, out)
    except Exception as e:  # noqa: BLE001 - every error of one job is that job's outcome
        out["outcome"], out["detail"] = "failed", f"{type(e).__name__}: {e}"[:300]
    out["seconds"] = time.monotonic() - out.pop("sent")
    return out


async def _whole(client: httpx.AsyncClient, base_url: str, job: Job, out: dict) -> None:
    if job.raw is not None:
        r = await client.post(base_url + job.path, content=job.raw, headers={"content-type": "application/json"})
    else:
        r = await client.post(base_url + job.path, json=job.body)
    out["status"] = r.status_code
    if job.kind == "malformed":
        _judge_rejection(job, r.status_code, r.text, out)
        return
    if r.status_code != 200:
        out["detail"] = f"HTTP {r.status_code}: {r.text[:200]}"
        return
    data = r.json()
    out["tokens"] = data["usage"]["completion_tokens"]
    _judge_completion(job, out["tokens"], data["choices"][0].get("finish_reason"), out)


async def _streamed(client: httpx.AsyncClient, base_url: str, job: Job, out: dict) -> None:
    finish = None
    async with client.stream("POST", base_url + job.path, json=job.body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["detail"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return
        events = _chunks(r.aiter_lines())
        try:
            if job.kind == "disconnect" and job.after_tokens == 0:
                # Close before the first token: after the delay, or at once if a token comes sooner.
                try:
                    async with asyncio.timeout(job.delay_s):
                        async for chunk in events:
                            if chunk_tokens(chunk, 0):
                                out["tokens"] = chunk_tokens(chunk, 0)
                                break
                        else:
                            out["detail"] = "the stream ended before its first token"
                            return
                except TimeoutError:
                    pass
                out["outcome"] = "cancelled"
                return  # leaving the block closes the connection: the server aborts the request
            async for chunk in events:
                out["tokens"] = chunk_tokens(chunk, out["tokens"])
                for choice in chunk.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
                if job.kind == "disconnect" and out["tokens"] >= job.after_tokens:
                    out["outcome"] = "cancelled"
                    return
        except StreamError as e:
            out["detail"] = str(e)
            return
    _judge_completion(job, out["tokens"], finish, out)


class StreamError(RuntimeError):
    pass


async def _chunks(lines):
    """The stream's JSON chunks; an error chunk raises :class:`StreamError`."""
    async for line in lines:
        chunk = parse_chunk(line)
        if chunk is not None and "error" in chunk:
            raise StreamError(f"error in stream: {str(chunk['error'])[:200]}")
        if chunk is not None:
            yield chunk


def parse_chunk(line: str) -> dict | None:
    """One server-sent event's JSON, or None for other lines and the final [DONE]."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line[6:])


def chunk_tokens(chunk: dict, so_far: int) -> int:
    """Tokens generated so far: the chunk's usage (``continuous_usage_stats``: a busy
    server may put several tokens in one chunk), else one more per chunk with content."""
    if chunk.get("usage"):
        return max(so_far, chunk["usage"]["completion_tokens"])
    choices = chunk.get("choices") or ()
    return so_far + sum(1 for c in choices if c.get("text") or (c.get("delta") or {}).get("content"))


def _judge_completion(job: Job, tokens: int, finish: str | None, out: dict) -> None:
    out["tokens"] = tokens
    if tokens == job.max_tokens and finish == "length":
        out["outcome"] = "completed"
    else:
        out["detail"] = f"{tokens} of {job.max_tokens} tokens, finish reason {finish!r}"


def _judge_rejection(job: Job, status: int, text: str, out: dict) -> None:
    if not 400 <= status < 500:
        out["detail"] = f"{job.malformed}: HTTP {status}, expected 4xx: {text[:200]}"
    elif job.field and job.field not in text:
        out["detail"] = f"{job.malformed}: HTTP {status} without naming {job.field}: {text[:200]}"
    else:
        out["outcome"] = "rejected"
