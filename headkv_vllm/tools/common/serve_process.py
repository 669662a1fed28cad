"""Start a real ``vllm serve`` process for one configuration, wait until it is
healthy, read its Prometheus gauges while it works, and stop it cleanly.

Used by ``headkv-vllm eval-needle`` and ``headkv-vllm bench`` so both measure what
users of the OpenAI-compatible server get.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 600  # a CPU engine starts in ~30 s, but 2 shared cores can make it much slower


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """One server: stock vLLM when ``headkv`` is None, else the HEADKV backend with these settings."""

    model: str
    headkv: dict | None = None
    max_model_len: int = 4096
    kv_cache_memory_bytes: int | None = None  # None: --gpu-memory-utilization decides
    gpu_memory_utilization: float = 0.3
    dtype: str = "float32"
    enforce_eager: bool = True
    max_num_seqs: int | None = None
    extra_args: tuple[str, ...] = ()

    def command(self, port: int) -> list[str]:
        vllm_bin = Path(sys.executable).with_name("vllm")
        # In a venv the console script sits next to the interpreter; in images that install
        # vLLM into the system Python it may not, and the module always runs.
        vllm = [str(vllm_bin)] if vllm_bin.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        cmd = [*vllm, "serve", self.model, "--dtype", self.dtype,
               "--max-model-len", str(self.max_model_len), "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log"]
        if self.kv_cache_memory_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        else:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.headkv is not None:
            cmd += ["--attention-backend", "headkv", "--additional-config", json.dumps({"headkv": self.headkv})]
        return cmd + list(self.extra_args)


class ServerError(RuntimeError):
    pass


def stop_servers_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``with VllmServer(...)`` blocks stop their server."""
    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``with VllmServer(config, log_path) as server: server.base_url ...``"""

    def __init__(self, config: ServerConfig, log_path: Path, start_timeout_s: float = START_TIMEOUT_S):
        self.config = config
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = config.command(self.port)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VllmServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            # Own process group, so stopping it also stops the engine core it spawns.
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with code {self.proc.returncode} during start-up "
                                  f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerError(f"vllm serve was not healthy after {self.start_timeout_s:.0f} s "
                          f"(log {self.log_path}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 15) -> str:
        """The first and last error lines of the log (vLLM prints the root cause first), else its last lines."""
        text = self.log_text().splitlines()
        errors = list(dict.fromkeys(line.strip() for line in text if re.search(r"\b\w+(Error|Exception): ", line)))
        return "\n".join(errors[:1] + errors[-1:] if len(errors) > 1 else errors) if errors else "\n".join(text[-lines:])

    def headkv_pool(self) -> dict | None:
        """The HEADKV start-up line: budgets and pool size in head pages."""
        m = re.search(r"HeadKV: policy=(\S+) kv_size=(\d+) .*?min/mean/max=(\d+)/([\d.]+)/(\d+) from (.*?); "
                      r"pool=(\d+) head pages of (\d+) tokens", self.log_text())
        if not m:
            return None
        return {"policy": m[1], "kv_size": int(m[2]), "budget_min": int(m[3]), "budget_mean": float(m[4]),
                "budget_max": int(m[5]), "budget_origin": m[6], "pool_head_pages": int(m[7]), "page_tokens": int(m[8])}

    def logged_kv_tokens(self) -> int | None:
        """vLLM's start-up line "KV cache size: N tokens" (its max concurrency x max_model_len)."""
        m = re.search(r"\w+ KV cache size: ([\d,]+) tokens", self.log_text())
        return int(m[1].replace(",", "")) if m else None

    def metrics(self, timeout_s: float = 60) -> dict[str, float]:
        """Prometheus samples by name (labels dropped; one engine)."""
        # Generous default: on a 2-core machine a busy server answers /metrics in seconds, and a
        # late answer is still a valid sample.
        return parse_prometheus(self.metrics_text(timeout_s))

    def metrics_text(self, timeout_s: float = 60) -> str:
        """The raw Prometheus text of ``/metrics`` (labels kept)."""
        r = httpx.get(f"{self.base_url}/metrics", timeout=timeout_s)
        r.raise_for_status()
        return r.text


def parse_prometheus(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


class Poller:
    """``with Poller(...)``: calls ``poll()`` every ``interval_s`` in a thread until the block ends."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.poll_errors: list[str] = []  # polls that raised (the thread carries on)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - one bad poll must not end a long run's sampling
                self.poll_errors.append(f"{type(e).__name__}: {e}"[:300])
            self._stop.wait(self.interval_s)

    def poll(self) -> None:
        raise NotImplementedError


class GaugeWatcher(Poller):
    """Polls the server's ``/metrics`` in a thread and keeps the maximum of some gauges.

    ``samples`` counts answered polls only; failed ones are counted in ``failures`` with the
    last error kept, so a run whose gauges were never read says so instead of reporting zeros."""

    def __init__(self, server: VllmServer, names: tuple[str, ...], interval_s: float = 0.1,
                 poll_timeout_s: float = 5.0):
        # A poll that hangs is abandoned and retried: one stuck request once covered a whole
        # 24-second run and left a single sample taken before the first request arrived.
        super().__init__(interval_s)
        self.server, self.names, self.poll_timeout_s = server, names, poll_timeout_s
        self.peak = {n: 0.0 for n in names}
        self.samples = 0
        self.failures = 0
        self.last_error: str | None = None
        self.load_averages: list[float] = []  # 1-minute load of the machine: other work skews timings

    def poll(self) -> None:
        self.load_averages.append(os.getloadavg()[0])
        try:
            values = self.server.metrics(self.poll_timeout_s)
        except Exception as e:  # noqa: BLE001 - the thread must outlive any one bad poll
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
        else:
            for n in self.names:
                if n in values:
                    self.peak[n] = max(self.peak[n], values[n])
            self.samples += 1
