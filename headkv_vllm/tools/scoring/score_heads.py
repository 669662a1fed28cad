"""``headkv-vllm score-heads``: per-head importance scores for a Hugging Face causal LM.

Runs the retrieval ("R") or retrieval-reasoning ("R2") probe of HeadKV
(docs/method.md section 1; needles and prompts in ``probes.py``, the
per-step rules in ``attention_credit.py``) over a grid of needle x context length x
depth, with greedy decoding. The prompt is prefilled with SDPA attention; each
decoding step then runs with eager attention so that the attention of the query
that produces the next token (the last row) can be read. Every finished trial is
appended to a trials file, so an interrupted run continues where it stopped.
A head's score is its mean over the trials answered correctly, L1-normalised
over all heads; the score file (``scores.write_scores``) keeps the per-query-head
scores and their KV-head aggregation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import time
from pathlib import Path

from headkv_vllm.tools.common.needle import Needle
from headkv_vllm.tools.scoring.probes import NEEDLES, PROBES, PromptBuilder, Trial, depths, grid, is_correct, lengths
from headkv_vllm.method.scores import (ScoreFileError, engine_lookup_note, identity_from_hf_config, lookup_help,
                                       write_scores)

TRIALS_FORMAT = "headkv-score-trials/1"
LENGTH_MARGIN = 16  # tokens kept free below the model's context besides the answer


@dataclasses.dataclass
class TrialResult:
    answer: str
    correct: bool
    steps: int
    seconds: float
    scores: list[list[float]]  # [layer][query head], summed over the decoding steps


def context_limit(config) -> int:
    return config.get_text_config().max_position_embeddings


class ProbeRunner:
    """One model, one probe: runs a trial and returns its answer and head credits."""

    def __init__(self, model, tokenizer, probe: str, haystack: str):
        import torch

        self.torch = torch
        self.model, self.tok, self.probe = model, tokenizer, probe
        self.builder = PromptBuilder(tokenizer, haystack)
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        text = model.config.get_text_config()
        self.shape = (text.num_hidden_layers, text.num_attention_heads)

    def max_new_tokens(self, needle_index: int) -> int:
        """R: twice the needle (answers restate it); R2: the target sentence's length."""
        n = self.builder.target_length(NEEDLES[self.probe][needle_index])
        return 2 * n if self.probe == "R" else n

    def run(self, trial: Trial) -> TrialResult:
        from headkv_vllm.tools.scoring.attention_credit import reasoning_credit, retrieval_credit

        torch = self.torch
        needle = NEEDLES[self.probe][trial.needle]
        prompt = self.builder.build(needle, trial.length, trial.depth)
        device = self.model.device
        ids = torch.tensor(prompt.ids, device=device)
        started = time.perf_counter()
        credit = torch.zeros(self.shape, device=device)
        answer: list[int] = []
        with torch.no_grad():
            cache = self.model(ids[None, :-1], use_cache=True, logits_to_keep=1).past_key_values
            token_in = ids[None, -1:]
            with _eager_attention(self.model):
                for _ in range(self.max_new_tokens(trial.needle)):
                    out = self.model(token_in, past_key_values=cache, use_cache=True, output_attentions=True)
                    cache = out.past_key_values
                    token = int(out.logits[0, -1].argmax())
                    if token in self.stop_ids or "\n" in self.tok.decode([token]):
                        break
                    attn = torch.stack([a[0, :, -1, :] for a in out.attentions])  # [L, Hq, positions]
                    if self.probe == "R":
                        step = retrieval_credit(attn, prompt.target_span, ids, token)
                    else:
                        step = reasoning_credit(attn, prompt.target_span)
                    credit += step
                    answer.append(token)
                    token_in = torch.tensor([[token]], device=device)
        text = self.tok.decode(answer, skip_special_tokens=True)
        return TrialResult(
            answer=text,
            correct=is_correct(self.probe, needle, text),
            steps=len(answer),
            seconds=time.perf_counter() - started,
            scores=credit.tolist(),
        )


@contextlib.contextmanager
def _eager_attention(model):
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


def needle_header(needle: Needle) -> dict:
    """A needle as a trials file's header names it (a file resumes only if its header matches):
    its sentences, question, answer, answer prefix and the indices of its target and distractor sentences."""
    distractor = next((i for i, s in enumerate(needle.sentences) if needle.distractor and needle.distractor in s), None)
    return {"sentences": needle.sentences, "question": needle.question, "answer": needle.answer,
            "target": needle.target, "distractor": distractor, "answer_prefix": needle.answer_prefix}


class TrialsFile:
    """Append-only JSON lines: a header naming model, probe and needles, then one line per trial."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.header = json.loads(json.dumps({"format": TRIALS_FORMAT, **header}))  # as read back
        self.records: dict[str, dict] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = path.read_text() if path.exists() else ""
        text = raw[: raw.rfind("\n") + 1]  # without a last line cut short by an interrupt
        if not text:
            path.write_text(json.dumps(self.header) + "\n")
            return
        if text != raw:
            path.write_text(text)
        lines = text.splitlines()
        found = json.loads(lines[0])
        if found != self.header:
            raise SystemExit(
                f"{path}: this trials file was written for {found.get('model', {}).get('name')!r} probe "
                f"{found.get('probe')!r} with other settings or needles. Pass another --trials-file, "
                f"or delete it to start over."
            )
        for line in lines[1:]:
            record = json.loads(line)
            self.records[record["key"]] = record

    def append(self, trial: Trial, result: TrialResult) -> dict:
        record = {"key": trial.key, **dataclasses.asdict(trial), **dataclasses.asdict(result)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.records[trial.key] = record
        return record


def mean_of_correct(records: list[dict]) -> tuple[list[list[float]], int]:
    """Head scores: the mean over the trials answered correctly (others are dropped)."""
    kept = [r["scores"] for r in records if r["correct"]]
    if not kept:
        raise ScoreFileError(
            f"none of the {len(records)} trials was answered correctly, so no head can be scored. "
            f"Use shorter context lengths (--max-length) or a stronger model."
        )
    rows, cols = len(kept[0]), len(kept[0][0])
    return [[sum(s[l][h] for s in kept) / len(kept) for h in range(cols)] for l in range(rows)], len(kept)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="headkv-vllm score-heads",
        description="Compute HeadKV head-importance scores for a Hugging Face causal LM with the "
        "retrieval (R) or retrieval-reasoning (R2) needle-in-a-haystack probe, and write a score "
        "file the engine reads (default: configs/<model>_<probe>.json under the current directory). "
        + lookup_help(),
    )
    p.add_argument("model", help="model folder or Hugging Face id (transformers must load it)")
    p.add_argument("--probe", choices=PROBES, default="R2", help="R = retrieval, R2 = retrieval-reasoning (default)")
    p.add_argument("--output", type=Path, help="score file to write (default: configs/<model>_<probe>.json "
                   "under the current directory)")
    p.add_argument("--trials-file", type=Path, help="per-trial results, appended as they finish, read to resume "
                   "(default: <output>.trials.jsonl)")
    p.add_argument("--min-length", type=int, default=1000, help="shortest context in tokens (default 1000)")
    p.add_argument("--max-length", type=int, default=10000,
                   help="longest context in tokens (default 10000), capped by the model's context")
    p.add_argument("--num-lengths", type=int, default=5, help="context lengths, evenly spaced (default 5)")
    p.add_argument("--num-depths", type=int, default=10, help="needle depths, linspace(0, 100) (default 10)")
    p.add_argument("--limit", type=int, help="run at most this many new trials, then stop (resume later)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p.parse_args(argv)


def load_model(name: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    import torch
    from tqdm import tqdm

    from headkv_vllm.tools.common.haystack import haystack_text

    argv = list(argv or [])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device, args.dtype)
    identity = identity_from_hf_config(model.config.get_text_config(), Path(args.model.rstrip("/")).name)
    output = args.output or Path("configs") / f"{identity.name}_{args.probe}.json"
    trials_path = args.trials_file or output.with_name(output.name + ".trials.jsonl")

    runner = ProbeRunner(model, tokenizer, args.probe, haystack_text())
    longest = max(runner.max_new_tokens(i) for i in range(len(NEEDLES[args.probe])))
    max_length = min(args.max_length, context_limit(model.config) - longest - LENGTH_MARGIN)
    if args.min_length > max_length:
        raise SystemExit(f"--min-length {args.min_length} exceeds the longest usable context {max_length}.")
    plan = grid(args.probe, lengths(args.min_length, max_length, args.num_lengths), depths(args.num_depths))

    needles = [needle_header(n) for n in NEEDLES[args.probe]]
    log = TrialsFile(trials_path, {"model": dataclasses.asdict(identity), "probe": args.probe, "needles": needles})
    todo = [t for t in plan if t.key not in log.records]
    if args.limit is not None:
        todo = todo[: args.limit]
    print(f"{identity.name}, probe {args.probe}: {len(plan)} trials, {len(plan) - len(todo)} done before "
          f"({trials_path}), {len(todo)} to run on {device}")
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="trial")
    correct = sum(log.records[t.key]["correct"] for t in plan if t.key in log.records)
    for trial in todo:
        result = runner.run(trial)
        log.append(trial, result)
        correct += result.correct
        bar.set_postfix(correct=correct, refresh=False)
        bar.update()
    bar.close()

    records = [log.records[t.key] for t in plan if t.key in log.records]
    if len(records) < len(plan):
        print(f"{len(records)} of {len(plan)} trials done; run the same command again to continue.")
        return 0
    try:
        scores, kept = mean_of_correct(records)
    except ScoreFileError as e:
        raise SystemExit(f"score-heads: {e}") from None
    path = write_scores(
        output, identity, args.probe, scores, trials=kept,
        command="headkv-vllm score-heads " + shlex.join(argv),
        trials_run=len(records),
        grid={"lengths": sorted({t.length for t in plan}), "depths": sorted({t.depth for t in plan}),
              "needles": len(NEEDLES[args.probe])},
        correct_by_length={str(n): sum(r["correct"] for r in records if r["length"] == n)
                           for n in sorted({t.length for t in plan})},
        correct_by_needle=[sum(r["correct"] for r in records if r["needle"] == i) for i in range(len(NEEDLES[args.probe]))],
        seconds=round(sum(r["seconds"] for r in records), 1),
        device=device,
    )
    print(f"{kept} of {len(records)} trials answered correctly; wrote {path}; {engine_lookup_note(path)}")
    return 0
