"""vLLM's OpenAI server (`vllm serve`) and its benchmark client (`vllm bench serve`),
run from `.venv-peers` (vLLM's CPU build, `make peers`) through bench/peers/vllm_cli.py.

`VllmServer` starts `vllm serve` as a subprocess on a loopback port, in a session of
its own, and stops it by that process id (its process group: the API server and the
engine processes it spawned) when the benchmark ends. `bench_serve` runs
`vllm bench serve` against any OpenAI-compatible base URL and returns vLLM's own
result JSON. Both write their output to log files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

from peers.vllm_runner import PeerUnavailable

CLI = Path(__file__).resolve().with_name("vllm_cli.py")

# The figures `vllm bench serve` saves that the side-by-side table shows, in order.
SUMMARY_KEYS = (
    "completed", "failed", "duration", "request_throughput", "output_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
    "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
)


def check_available(python: Path) -> None:
    if not python.exists():
        raise PeerUnavailable(f"{python} not found; `make peers` builds vLLM's CPU build into it")


def _env(kv_cache_gib: Optional[int] = None, reserved_cpus: Optional[int] = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if kv_cache_gib is not None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    if reserved_cpus is not None:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved_cpus))
    return env


def _signal_group(pgid: int, sig: int) -> bool:
    """Send sig to the process group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a zombie leader still holds the group id


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class VllmServer:
    """`vllm serve MODEL_DIR` on 127.0.0.1:port, serving `served_model_name`."""

    def __init__(self, python: Path, model_dir: Path, served_model_name: str, port: int,
                 log_path: Path, kv_cache_gib: int = 4, reserved_cpus: Optional[int] = 0,
                 extra_args: Sequence[str] = ()) -> None:
        check_available(python)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.log_path = log_path
        self.cmd = [str(python), str(CLI), "serve", str(model_dir), "--host", "127.0.0.1",
                    "--port", str(port), "--served-model-name", served_model_name,
                    "--dtype", "float32", "--enforce-eager", *extra_args]
        self.env = _env(kv_cache_gib, reserved_cpus)
        self.proc: Optional[subprocess.Popen] = None
        self.startup_s: Optional[float] = None

    def start(self, timeout_s: float = 300.0) -> "VllmServer":
        if self.proc is not None:
            raise RuntimeError("this vllm serve is already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(self.cmd) + "\n")
            log.flush()
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with status {self.proc.returncode} while "
                                   f"starting; {self.log_path} ends:\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    # Ours only if our process is still the one alive (not another
                    # server that took the port first).
                    if r.status == 200 and self.proc.poll() is None:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vllm serve was not ready within {timeout_s:g} s; see {self.log_path}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server's process group (its id is the server's pid: it was
        started in a session of its own), SIGKILL to whatever of it is left after
        `timeout_s` (engine processes can outlive their parent)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid
        if not _signal_group(pgid, signal.SIGTERM):
            proc.wait()
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _signal_group(pgid, 0):
            proc.poll()  # reap the leader so the group can empty
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "VllmServer":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def bench_serve(python: Path, base_url: str, model_name: str, tokenizer_dir: Path,
                flags: Sequence[str], log_path: Path, timeout_s: float = 600.0) -> dict[str, Any]:
    """`vllm bench serve --base-url <server> --model <name> --tokenizer <dir> FLAGS`;
    returns the result JSON it saves (every field vLLM writes, per-request arrays
    dropped)."""
    check_available(python)
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    with tempfile.TemporaryDirectory(prefix="yard-bench-serve-") as tmp:
        cmd = [str(python), str(CLI), "bench", "serve", "--base-url", root,
               "--endpoint", "/v1/completions", "--backend", "openai", "--model", model_name,
               "--tokenizer", str(tokenizer_dir), *flags,
               "--save-result", "--result-dir", tmp, "--result-filename", "result.json"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=_env(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"vllm bench serve did not finish within {timeout_s:g} s; "
                                   f"see {log_path}") from None
        out = Path(tmp) / "result.json"
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"vllm bench serve exited with status {proc.returncode}; "
                               f"{log_path} ends:\n{_tail(log_path)}")
        raw = json.loads(out.read_text())
    # Per-request arrays (ttfts, itls, generated texts...) stay in the log's summary only.
    return {k: v for k, v in raw.items() if not isinstance(v, list)}


class RayServeLLMServer(VllmServer):
    """Ray Serve LLM (bench/peers/ray_serve_llm.py) with VllmServer's lifecycle:
    started in a session of its own, ready when /v1/models answers, stopped by its
    process group."""

    def __init__(self, python: Path, model_dir: Path, served_model_name: str, port: int,
                 log_path: Path, kv_cache_gib: int = 4, reserved_cpus: Optional[int] = 0) -> None:
        super().__init__(python, model_dir, served_model_name, port, log_path, kv_cache_gib, reserved_cpus)
        script = Path(__file__).resolve().with_name("ray_serve_llm.py")
        self.cmd = [str(python), str(script), str(model_dir), served_model_name, str(port)]
        self.served_model_name = served_model_name

    def _wait_ready(self, timeout_s: float) -> None:
        """Its ingress lists the model before the engine replica is up: ready once a
        one-token completion comes back."""
        deadline = time.monotonic() + timeout_s
        super()._wait_ready(timeout_s)
        body = json.dumps({"model": self.served_model_name, "prompt": "hi", "max_tokens": 1}).encode()
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"Ray Serve LLM exited while starting; {self.log_path} ends:\n"
                                   f"{_tail(self.log_path)}")
            request = urllib.request.Request(self.base_url + "/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise RuntimeError(f"Ray Serve LLM did not complete a request within {timeout_s:g} s; see {self.log_path}")
