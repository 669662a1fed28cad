"""What the engine tests share: the repository root, the default model, and a real
``vllm.LLM`` run in a fresh process (``tests/support/llm_runner.py`` and the other
``*_probe.py`` scripts beside it)."""

import io
import json
import multiprocessing
import os
import runpy
import sys
import tempfile
from pathlib import Path

from headkv_vllm.method.scores import ModelIdentity

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
SMOL = ModelIdentity("SmolLM2-135M-Instruct", 30, 9, 3, 64)


def run_engine_script(script: str, spec: dict, timeout: float = 900) -> dict:
    """Run ``tests/support/<script>`` (a real ``vllm.LLM``) in a fresh process with ``spec``
    on stdin and return the JSON it prints after its ``<NAME>_RESULT`` marker.
    A fresh process per engine keeps tests independent; it is forked from a process that
    has imported vLLM once (:func:`_engine_processes`)."""
    path = ROOT / "tests" / "support" / script
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        proc = _engine_processes().Process(
            target=_run_script, args=(str(path), json.dumps(spec), dict(os.environ), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise AssertionError(f"{script} did not finish in {timeout:.0f} s:\n{err.read_text()[-6000:]}")
        stdout, stderr = out.read_text(), err.read_text()
    if proc.exitcode != 0:
        raise AssertionError(f"{script} failed (exit {proc.exitcode}):\n{stderr[-6000:]}")
    marker = path.stem.upper() + "_RESULT "
    line = next(l for l in stdout.splitlines() if l.startswith(marker))
    return json.loads(line.split(" ", 1)[1])


_CONTEXT = None


def _engine_processes():
    """Processes forked from one that imported vLLM when the first engine started: each
    engine's process starts with vLLM loaded (about 8 of an engine's 13 s of start-up on
    two cores) and with nothing else from the engines before it."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["vllm", "vllm.entrypoints.llm"])
    return _CONTEXT


def _run_script(path: str, spec: str, env: dict, stdout: str, stderr: str) -> None:
    """In the forked process: what ``python <path> < spec`` would do, with the caller's
    environment now (the fork server's is from when it started), output to files."""
    os.environ.clear()
    os.environ.update(env, PYTHONUNBUFFERED="1")
    os.chdir(ROOT)
    for fd, name in ((1, stdout), (2, stderr)):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdin = io.StringIO(spec)
    sys.argv = [path]
    sys.path.insert(0, str(Path(path).parent))
    runpy.run_path(path, run_name="__main__")
    sys.stdout.flush()
    sys.stderr.flush()


def run_llm(spec: dict, timeout: float = 900) -> dict:
    return run_engine_script("llm_runner.py", spec, timeout)


def engine(model_dir, **headkv):
    """LLM kwargs for SmolLM2 on the CPU; HEADKV with ``headkv`` settings when given."""
    # A fixed 1 GiB cache: vLLM allocates and zeroes the CPU pool at start-up, and the
    # default (30% of RAM) took 13 s of every engine's start.
    kw = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=4096,
              kv_cache_memory_bytes=2**30, seed=0, max_num_seqs=8)
    if headkv:
        kw.update(attention_backend="headkv", additional_config={"headkv": headkv})
    return kw
