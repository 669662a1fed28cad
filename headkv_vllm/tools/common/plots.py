"""Figures for ``eval-needle`` (depth x length heatmaps), ``eval-ruler`` (task scores),
``bench`` (throughput and peak concurrency against stock vLLM), ``stress`` and ``calibrate``."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def needle_heatmaps(result: dict, out: Path) -> list[Path]:
    """One PNG per method; one panel per KV size; cell = mean ROUGE-1 recall over the needles."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _pyplot()
    cmap = LinearSegmentedColormap.from_list("needle", ["#d7301f", "#fdd835", "#1a9850"])
    lengths, depths = result["grid"]["lengths"], result["grid"]["depths"]
    by_method: dict[str, list[dict]] = {}
    for run in result["runs"]:
        by_method.setdefault(run["method"], []).append(run)
    paths = []
    for method, runs in by_method.items():
        runs = sorted(runs, key=lambda r: r["kv_size"] or 0)
        fig, axes = plt.subplots(1, len(runs), figsize=(0.55 * len(lengths) * len(runs) + 1.5, 0.45 * len(depths) + 1.6),
                                 squeeze=False)
        for ax, run in zip(axes[0], runs):
            grid = [[_mean([c["rouge1"] for c in run["cells"] if c["length"] == n and c["depth"] == d])
                     for n in lengths] for d in depths]
            image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
            mean = _mean([c["rouge1"] for c in run["cells"]])
            ax.set_title(f"{run['label']}: {100 * mean:.1f}", fontsize=9)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("context length (tokens)", fontsize=8)
        axes[0][0].set_ylabel("needle depth (%)", fontsize=8)
        fig.colorbar(image, ax=list(axes[0]), fraction=0.03, label="ROUGE-1 recall")
        fig.suptitle(f"Needle in a haystack, {result['model']}", fontsize=10, y=1.06)
        path = out / f"heatmap_{method}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def length_span(length_range: tuple[int, int]) -> str:
    """``(lo, hi)`` as a column label: "1000-3000", or "4000" when both ends are equal."""
    lo, hi = length_range
    return str(lo) if lo == hi else f"{lo}-{hi}"


def needle_summary_plot(result: dict, length_range: tuple[int, int], path: Path) -> Path:
    """Mean ROUGE-1 recall over ``length_range`` per method against KV size, the full cache as a line."""
    return score_vs_kv_plot(result["summary"], "rouge1_range", f"ROUGE-1 recall, {length_span(length_range)} tokens",
                            f"Needle in a haystack, {result['model']}", path)


def score_vs_kv_plot(rows: list[dict], key: str, ylabel: str, title: str, path: Path) -> Path:
    """``row[key]`` (0-100) of each method's summary rows against KV size; the full cache
    (the row without a KV size) as a horizontal line."""
    plt = _pyplot()
    full = next((r for r in rows if r["kv_size"] is None), None)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    if full:
        ax.axhline(full[key], color="grey", linestyle="--", label=f"full cache ({full[key]:.1f})")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kv_size"] is not None))
    for method in methods:
        points = sorted((r["kv_size"], r[key], r["label"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=points[0][2].split(" @ ")[0])
    sizes = sorted({r["kv_size"] for r in rows if r["kv_size"] is not None})
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("average KV size (tokens per KV head)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def ruler_task_heatmap(result: dict, path: Path) -> Path:
    """``eval-ruler``: one row per method and KV size, one column per task and the average."""
    plt = _pyplot()
    tasks = result["grid"]["tasks"]
    rows = result["summary"]
    grid = [[r["tasks"][t] for t in tasks] + [r["average"]] for r in rows]
    fig, ax = plt.subplots(figsize=(0.8 * len(tasks) + 3.2, 0.35 * len(rows) + 1.6))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "average"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.03, label="score")
    ax.set_title(f"RULER-style tasks, {result['model']}", fontsize=10)
    return _save(plt, fig, path)


def bench_plot(result: dict, path: Path) -> Path:
    """Output tokens/s and peak running requests of each HEADKV KV size, as multiples of stock."""
    plt = _pyplot()
    runs = [c for c in result["configs"] if c.get("kv_size") and "error" not in c]
    stock = next((c for c in result["configs"] if c["method"] == "full" and "error" not in c), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = (("output_tokens_per_s", "output tokens/s"), ("peak_running", "peak concurrent running requests"))
    for ax, (key, name) in zip(axes, panels):
        shown = [c for c in runs if c[key] is not None]  # peaks are None where no gauge poll was answered
        sizes = [c["kv_size"] for c in shown]
        relative = bool(stock and stock[key])
        if relative:
            values = [c[key] / stock[key] for c in shown]
            ax.axhline(1.0, color="grey", linestyle="--", label=f"stock vLLM = 1x ({stock[key]:.1f})")
            ax.set_ylabel(f"{name}, x stock")
        else:
            values = [c[key] for c in shown]
            ax.set_ylabel(name)
        ax.plot(sizes, values, marker="o", label=runs[0]["config"].split(" @ ")[0] if runs else "HEADKV")
        for s, v in zip(sizes, values):
            ax.annotate(f"{v:.2f}x" if relative else f"{v:.0f}", (s, v), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("average KV size (tokens per KV head)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    w = result["workload"]
    fig.suptitle(f"{result['model']}: {w['num_requests']} requests, {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} "
                 f"prompt + {w['output_tokens']} output tokens, KV cache {result['kv_cache_bytes'] / 2**20:.0f} MiB",
                 fontsize=9)
    return _save(plt, fig, path)


def itl_plot(result: dict, path: Path) -> Path | None:
    """Inter-token latency distribution of every configuration: the share of gaps between
    two streamed tokens of a request that are at most x. A decode that stalls behind a
    long prefill shows as a tail to the right. None (no file) when no configuration has
    inter-token gaps (one output token per request)."""
    shown = [c for c in result["configs"] if "error" not in c and c.get("itl_percentiles_s")]
    if not shown:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for c in shown:
        pct = c["itl_percentiles_s"]
        ax.plot([1000 * v for v in pct], [q / 100 for q in range(len(pct))], label=c["config"],
                linestyle="--" if c["method"] == "full" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("inter-token latency (ms, log)")
    ax.set_ylabel("share of inter-token gaps")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    w = result["workload"]
    ax.set_title(f"{result['model']}: {w['num_requests']} requests, {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} "
                 f"prompt + {w['output_tokens']} output tokens", fontsize=9)
    return _save(plt, fig, path)


def stress_plot(result: dict, path: Path) -> Path:
    """``stress``: the server's RSS per process, head pages in use and requests running
    and waiting over the run; idle checkpoints as dots (their pages must be 0)."""
    plt = _pyplot()
    samples, checks = result["samples"], result["checkpoints"]
    minutes = lambda rows: [r["t"] / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    for proc, style in (("total", "-"), ("worker", "-."), ("engine_core", "--"), ("api_server", ":")):
        axes[0].plot(minutes(samples), [s["rss_mib"][proc] for s in samples], style, label=proc.replace("_", " "))
    axes[0].plot(minutes(checks), [c["rss_mib"]["total"] for c in checks], "o", color="black", markersize=3,
                 label="idle checkpoints")
    warmup = result["drift"]["warmup_s"] / 60
    axes[0].axvline(warmup, color="grey", linestyle="--", linewidth=0.8)
    drift = result["drift"].get("rss_total_drift_pct")
    axes[0].set_title("server RSS" + ("" if drift is None else f" (total drift after warm-up: {drift:+.2f}%)"),
                      fontsize=9)
    axes[0].set_ylabel("MiB")
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=7, loc="lower right")
    with_gauges = [s for s in samples if s.get("pages_in_use") is not None]
    axes[1].plot(minutes(with_gauges), [s["pages_in_use"] for s in with_gauges], label="in use")
    axes[1].plot(minutes(checks), [c.get("pages_in_use") or 0 for c in checks], "o", color="black", markersize=3,
                 label="at idle checkpoints")
    pool = (result.get("server", {}).get("headkv_pool") or {}).get("pool_head_pages")
    if pool:
        axes[1].axhline(pool, color="grey", linestyle="--", label=f"pool ({pool})")
    axes[1].set_ylabel("head pages")
    axes[1].legend(fontsize=7, loc="upper right")
    for key in ("running", "waiting"):
        rows = [s for s in samples if s.get(key) is not None]
        axes[2].plot(minutes(rows), [s[key] for s in rows], label=key)
    axes[2].set_ylabel("requests")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=7, loc="upper right")
    s = result["summary"]
    fig.suptitle(f"{result['model']}: {s['requests']} requests, {s['outcomes'].get('cancelled', 0)} cancelled, "
                 f"{s['outcomes'].get('rejected', 0)} malformed rejected, {s['preemptions']:.0f} preemptions",
                 fontsize=10)
    return _save(plt, fig, path)


def stress_compare_plot(results: dict[str, dict], path: Path) -> Path:
    """``stress --compare``: growth of the RSS of the worker, the engine core and the API
    server since the first idle checkpoint, against requests done, one line per run
    (pools differ between runs; growth compares)."""
    plt = _pyplot()
    procs = ("worker", "engine_core", "api_server")
    fig, axes = plt.subplots(1, len(procs), figsize=(4.2 * len(procs), 3.8))
    for name, result in results.items():
        checks = result["checkpoints"]
        for ax, proc in zip(axes, procs):
            first = checks[0]["rss_mib"][proc]
            ax.plot([c["requests_done"] for c in checks], [c["rss_mib"][proc] - first for c in checks], marker=".",
                    label=f"{name} (from {first:.0f} MiB)")
    for ax, proc in zip(axes, procs):
        ax.set_title(proc.replace("_", " "), fontsize=9)
        ax.set_xlabel("requests done")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    axes[0].set_ylabel("RSS growth since the first idle checkpoint (MiB)")
    fig.suptitle("Server RSS under headkv-vllm stress", fontsize=10)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def calibration_plot(result: dict, path: Path) -> Path:
    """``calibrate``: score against beta, one panel per KV size, one line per window; the choice circled."""
    plt = _pyplot()
    kvs, chosen = result["kv_sizes"], result.get("chosen", {})
    fig, axes = plt.subplots(1, len(kvs), figsize=(3.6 * len(kvs), 3.2), sharey=True, squeeze=False)
    for ax, kv in zip(axes[0], kvs):
        for window in result["windows"]:
            runs = sorted((r for r in result["runs"].values() if r["window"] == window), key=lambda r: r["beta"])
            ax.plot([r["beta"] for r in runs], [r["mean_rouge1"][str(kv)] for r in runs], marker="o",
                    label=f"window {window}")
        if chosen:
            beta = chosen["beta"][str(kv)]
            run = next(r for r in result["runs"].values() if r["window"] == chosen["window"] and r["beta"] == beta)
            ax.plot([beta], [run["mean_rouge1"][str(kv)]], "o", ms=14, mfc="none", mec="k")
        ax.set_xscale("log")
        ax.set_title(f"KV size {kv}")
        ax.set_xlabel("beta")
    axes[0][0].set_ylabel("ROUGE-1 recall (calibration prompts)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{result['model']} {result['probe']} calibration (chosen: circled)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
