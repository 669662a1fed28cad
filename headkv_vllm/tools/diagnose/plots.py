"""Figures of ``headkv-vllm diagnose-needle``: per-head heatmaps and the summary."""

from __future__ import annotations

from pathlib import Path

from headkv_vllm.tools.common.plots import _pyplot, _save

METHOD_COLOURS = {"headkv-r2": ("#08306b", "#2171b5", "#6baed6", "#9ecae1"),
                  "headkv-r": ("#7f2704", "#d94801", "#fd8d3c", "#fdbe85"),
                  "snapkv": ("#000000",), "pyramidkv": ("#4d9221",)}


def _slug(method: str, beta: float | None, end: str) -> str:
    return method + ("" if beta is None else f"_beta{beta:g}") + f"_{end}"


def heatmaps(result: dict, out: Path, betas: list[float], pool_kernel: int) -> list[Path]:
    """One PNG per (method, beta in ``betas``, window end) at ``pool_kernel``; a panel per window and KV
    size: layers x KV heads, colour = answer retention (mean over the prompts), number = budget."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _pyplot()
    cmap = LinearSegmentedColormap.from_list("needle", ["#d7301f", "#fdd835", "#1a9850"])
    groups: dict[tuple, list[dict]] = {}
    for c in result["configs"]:
        if c["pool_kernel"] == pool_kernel and (c["beta"] is None or c["beta"] in betas):
            groups.setdefault((c["method"], c["beta"], c["window_end"]), []).append(c)
    paths = []
    for (method, beta, end), configs in groups.items():
        configs.sort(key=lambda c: (c["kv_size"], c["window"]))
        layers, heads = len(configs[0]["retention"]), len(configs[0]["retention"][0])
        fig, axes = plt.subplots(1, len(configs), figsize=(0.5 * heads * len(configs) + 2.2, 0.2 * layers + 1.8),
                                 squeeze=False)
        for ax, c in zip(axes[0], configs):
            image = ax.imshow(c["retention"], cmap=cmap, vmin=0, vmax=1, aspect="auto")
            for l in range(layers):
                for h in range(heads):
                    ax.text(h, l, str(c["budget"][l][h]), ha="center", va="center", fontsize=5.5)
            ax.set_title(f"window {c['window']}, kv {c['kv_size']}\nmean {c['mean_retention']:.2f}, "
                         f"{c['heads_with_needle']:g}/{c['heads']} heads", fontsize=7)
            ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=6)
            ax.set_yticks(range(0, layers, 2), [str(l) for l in range(0, layers, 2)], fontsize=6)
            ax.set_xlabel("KV head", fontsize=7)
        axes[0][0].set_ylabel("layer", fontsize=7)
        fig.colorbar(image, ax=list(axes[0]), fraction=0.04, label="needle-answer tokens kept (share)")
        label = configs[0]["label"] + ("" if beta is None else f", beta {beta:g}")
        fig.suptitle(f"{label}, pool {pool_kernel}, window end {end} (number: tokens kept per head)", fontsize=8)
        path = out / f"heatmap_{_slug(method, beta, end)}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def summary_plot(result: dict, path: Path) -> Path:
    """Mean answer retention and heads keeping the needle against the window, one panel column per
    (pool kernel, window end), one line per method and beta (and KV size when several)."""
    plt = _pyplot()
    configs = result["configs"]
    columns = [(p, e) for p in sorted({c["pool_kernel"] for c in configs}, reverse=True)
               for e in ("last", "user-text") if any(c["pool_kernel"] == p and c["window_end"] == e for c in configs)]
    kv_sizes = sorted({c["kv_size"] for c in configs})
    fig, axes = plt.subplots(2, len(columns), figsize=(3.6 * len(columns), 6.2), squeeze=False, sharey="row")
    for col, (pool, end) in enumerate(columns):
        chosen = [c for c in configs if c["pool_kernel"] == pool and c["window_end"] == end]
        lines: dict[tuple, list[dict]] = {}
        for c in chosen:
            lines.setdefault((c["method"], c["beta"], c["kv_size"]), []).append(c)
        for (method, beta, kv), points in lines.items():
            points.sort(key=lambda c: c["window"])
            betas = sorted({c["beta"] for c in chosen if c["method"] == method and c["beta"] is not None})
            shades = METHOD_COLOURS.get(method, ("grey",))
            colour = shades[min(betas.index(beta), len(shades) - 1)] if beta is not None else shades[0]
            label = points[0]["label"] + ("" if beta is None else f" b{beta:g}") + (f" kv{kv}" if len(kv_sizes) > 1 else "")
            style = "--" if method == "snapkv" else "-"
            windows = [c["window"] for c in points]
            axes[0][col].plot(windows, [c["mean_retention"] for c in points], style, marker="o", ms=3, color=colour,
                              label=label)
            axes[1][col].plot(windows, [c["heads_with_needle"] for c in points], style, marker="o", ms=3, color=colour)
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ticks = sorted({c["window"] for c in chosen})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.grid(alpha=0.3)
            ax.set_xlabel("observation window (tokens)", fontsize=8)
        axes[0][col].set_title(f"pool {pool}, window end: {end}", fontsize=9)
    axes[0][0].set_ylabel("answer tokens kept, mean over heads", fontsize=8)
    heads = configs[0]["heads"]
    axes[1][0].set_ylabel(f"heads keeping >= {result['kept_needle_threshold']:g} of the answer (of {heads})", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(f"Needle retention by KV head, {result['model']}", fontsize=10)
    return _save(plt, fig, path)
