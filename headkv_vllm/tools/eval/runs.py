"""What ``eval-needle`` and ``eval-ruler`` share: one ``vllm serve`` per method (or a
server that is already running), every prompt of a method sent at once and answered
greedily through the OpenAI API, the method settings as recorded, and ``--resume``'s
bookkeeping (keep an earlier run's finished rows, ask only for the missing ones).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Callable, Hashable

from headkv_vllm.tools.common.methods import (FULL, Method, MethodError, build_methods, model_identity, parse_ints,
                                       parse_names, recorded_served)

# Row order of the summary tables: the full cache first, then the HeadKV variants.
TABLE_ORDER = (FULL, "headkv-r2", "headkv-r2-paper", "headkv-r", "headkv-r-paper", "snapkv", "pyramidkv")


@dataclasses.dataclass(frozen=True)
class Ask:
    """One chat request: its messages, answer length limit and chat-template options."""

    messages: list[dict]
    max_tokens: int
    options: dict


def add_method_options(p: argparse.ArgumentParser) -> None:
    """The options that choose the model, the methods and their servers."""
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="local model folder (served as is)")
    p.add_argument("--methods", default="full,headkv-r2,headkv-r,snapkv,pyramidkv",
                   help="comma-separated: full, headkv-r2, headkv-r, snapkv, pyramidkv, headkv-r2-paper, headkv-r-paper "
                        "(the paper's window 8 and beta 1.01, whatever a score file's calibration says)")
    p.add_argument("--kv-sizes", default="32,64,128,256", help="average KV sizes (tokens per KV head) to compare")
    p.add_argument("--scores-r", help="score file for headkv-r (default: the 'R' file for the model in configs/)")
    p.add_argument("--scores-r2", help="score file for headkv-r2 (default: the 'R2' file for the model in configs/)")
    p.add_argument("--headkv-settings", default="{}", help="JSON merged into every HEADKV config, e.g. '{\"beta\": 1.2}'")
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight per server (0: all at once)")
    p.add_argument("--kv-cache-bytes", type=int, help="fixed KV cache size (default: --gpu-memory-utilization 0.3)")
    p.add_argument("--base-url", help="evaluate this running server (one method, one KV size) instead of starting servers")


def check_method_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse :func:`add_method_options`' values into ``args.method_names``,
    ``args.kv_size_list`` and ``args.settings``; a bad value exits through ``p.error``."""
    try:
        args.method_names = parse_names(args.methods, "--methods")
        args.kv_size_list = parse_ints(args.kv_sizes, "--kv-sizes", minimum=9)
        args.settings = json.loads(args.headkv_settings)
    except json.JSONDecodeError as e:
        p.error(f"--headkv-settings is not valid JSON ({e}); pass e.g. '{{\"beta\": 1.2}}'.")
    except MethodError as e:
        p.error(str(e))
    if args.base_url and (len(args.method_names) != 1 or (args.method_names != [FULL] and len(args.kv_size_list) != 1)):
        p.error("--base-url evaluates one running server: give exactly one --methods entry and one --kv-sizes value "
                "(the ones the server runs).")


def methods_of(args: argparse.Namespace) -> list[Method]:
    """The methods :func:`check_method_options` chose; raises :class:`MethodError` (a missing score file)."""
    return build_methods(args.method_names, args.kv_size_list, model_identity(args.model),
                         {"headkv-r": args.scores_r, "headkv-r2": args.scores_r2}, args.settings)


def table_order(row: dict) -> tuple:
    """Sort key of a summary row: by KV size (full cache first), then :data:`TABLE_ORDER`."""
    order = TABLE_ORDER.index(row["method"]) if row["method"] in TABLE_ORDER else len(TABLE_ORDER)
    return row["kv_size"] or 0, order


def portable(settings: dict | None) -> dict | None:
    """Settings as recorded: a score file inside the project is named relative to it."""
    if not settings or "scores" not in settings:
        return settings
    root = Path(__file__).resolve().parents[3]
    path = Path(settings["scores"]).resolve()
    shown = str(path.relative_to(root)) if path.is_relative_to(root) else settings["scores"]
    return {**settings, "scores": shown}


def ask_method(method: Method, asks: list[Ask], *, model: str, base_url: str | None, max_model_len: int,
               kv_cache_bytes: int | None, concurrency: int, log_dir: Path, unit: str) -> tuple[list, dict]:
    """Answer ``asks`` with ``method``: on ``base_url`` when given, else on a server started
    for it (``max_model_len`` rounded up to 16 tokens). Returns the answers as
    (text, prompt tokens) in order, and the run's record without its rows."""
    from headkv_vllm.tools.common.serve_process import ServerConfig, VllmServer

    started = time.monotonic()
    if base_url:
        answers = asyncio.run(ask_all(base_url, None, asks, concurrency, method.label, unit))
        server_info: dict = {"base_url": base_url}
    else:
        config = ServerConfig(model=model, headkv=method.headkv, max_model_len=-(-max_model_len // 16) * 16,
                              kv_cache_memory_bytes=kv_cache_bytes)
        slug = method.name if method.kv_size is None else f"{method.name}_{method.kv_size}"
        with VllmServer(config, log_dir / f"{slug}.log") as server:
            answers = asyncio.run(ask_all(server.base_url, model, asks, concurrency, method.label, unit))
            server_info = {"command": "vllm serve " + shlex.join(server.command[2:]).replace(str(server.port), "PORT"),
                           "headkv_pool": server.headkv_pool(), "vllm_logged_kv_tokens": server.logged_kv_tokens()}
    return answers, {"method": method.name, "kv_size": method.kv_size, "label": method.label,
                     "headkv": portable(method.headkv), "served": method.served, "server": server_info,
                     "wall_s": round(time.monotonic() - started, 1)}


async def ask_all(base_url: str, model: str | None, asks: list[Ask], concurrency: int, label: str,
                  unit: str) -> list[tuple[str, int]]:
    """Greedy answers to ``asks`` as (text, prompt tokens), at most ``concurrency`` in
    flight (0: all); ``model`` None asks the server which model it serves."""
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=3600, max_retries=0)
    if model is None:
        model = (await client.models.list()).data[0].id
    limit = asyncio.Semaphore(concurrency or len(asks))

    async def ask(i: int, request: Ask):
        async with limit:
            reply = await client.chat.completions.create(model=model, messages=request.messages,
                                                         max_tokens=request.max_tokens, temperature=0.0,
                                                         extra_body=request.options)
        return i, reply.choices[0].message.content or "", reply.usage.prompt_tokens

    answers: list = [None] * len(asks)
    with tqdm(total=len(asks), desc=f"{label:>18}", unit=unit) as bar:
        for done in asyncio.as_completed([ask(i, a) for i, a in enumerate(asks)]):
            i, text, prompt_tokens = await done
            answers[i] = (text, prompt_tokens)
            bar.update()
    await client.close()
    return answers


def earlier_rows(runs: list[dict], field: str, row_key: Callable[[dict], Hashable],
                 keep: Callable[[dict], bool]) -> dict:
    """An earlier result's runs as {(method, KV size): (run record, {row key: row})},
    with only the rows ``keep`` accepts."""
    return {(run["method"], run["kv_size"]): (run, {row_key(r): r for r in run[field] if keep(r)}) for run in runs}


def run_methods(methods: list[Method], keys: list[Hashable], earlier: dict, field: str,
                row_key: Callable[[dict], Hashable], evaluate: Callable[[Method, list[int]], dict],
                save: Callable[[list[dict]], None]) -> list[dict]:
    """One run per method with a row per key, in ``keys`` order. Rows an earlier run of
    the same method and settings has (``earlier``, from :func:`earlier_rows`) are kept;
    ``evaluate(method, indices)`` answers the others and returns a run record with
    their rows under ``field``. ``save(runs)`` is called after each method."""
    runs: list[dict] = []
    for method in methods:
        done_run, done = earlier.get((method.name, method.kv_size), (None, {}))
        if done_run and (done_run["headkv"] != portable(method.headkv) or recorded_served(done_run) != method.served):
            done_run, done = None, {}
        todo = [i for i, key in enumerate(keys) if key not in done]
        run = done_run
        if todo:
            run = evaluate(method, todo)
            if done_run:
                run["wall_s"] = round(run["wall_s"] + done_run["wall_s"], 1)
        rows = {**done, **{row_key(r): r for r in run[field]}}
        run[field] = [rows[key] for key in keys]
        runs.append(run)
        save(runs)
    return runs
