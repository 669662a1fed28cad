"""Runs one real ``vllm.LLM`` from a JSON spec on stdin and prints a JSON result.

spec: {"engine": {LLM kwargs}, "prompts": [str | [token ids]], "sampling": {SamplingParams kwargs},
       "extra_args": [dict | None per prompt] (optional: SamplingParams.extra_args, e.g. headkv_kv_size)}
result: {"token_ids": [[...]], "text": [...], "logprobs": [[{token: logprob}]] (when asked)}
"""

import json
import sys


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["engine"])
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in spec["prompts"]]
    extra = spec.get("extra_args") or [None] * len(prompts)
    params = [SamplingParams(**spec.get("sampling", {}), extra_args=e) for e in extra]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "text": [o.outputs[0].text for o in outs],
    }
    if spec.get("sampling", {}).get("logprobs"):
        result["logprobs"] = [
            [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs
        ]
    print("LLM_RUNNER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
