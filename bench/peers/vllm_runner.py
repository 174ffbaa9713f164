"""Runs bench/peers/vllm_offline.py under the peers venv's interpreter.

vLLM lives in its own venv (`.venv-peers`, `make peers`): it pins its own torch and
transformers, and its spawned workers should not share our process. The prompts go
over in a file, the result comes back as JSON; vLLM's chatter goes to a log file.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

SCRIPT = Path(__file__).resolve().with_name("vllm_offline.py")


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed); the benchmark skips it."""


def run_vllm(python: Path, model_dir: Path, prompts: list[list[int]], output_len: int,
             kv_cache_space_gib: int, reserved_cpus: Optional[int], warmup_prompts: int,
             log_path: Path, timeout_s: float) -> dict[str, Any]:
    if not python.exists():
        raise PeerUnavailable(f"{python} not found; `make peers` builds vLLM's CPU "
                              "build into it")
    with tempfile.TemporaryDirectory(prefix="yard-bench-vllm-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        out_file = Path(tmp) / "result.json"
        cmd = [str(python), str(SCRIPT), "--model", str(model_dir),
               "--prompts-file", str(prompts_file), "--output-len", str(output_len),
               "--kv-cache-space", str(kv_cache_space_gib),
               "--warmup-prompts", str(warmup_prompts),
               "--return-token-ids", "--out", str(out_file)]
        if reserved_cpus is not None:
            cmd += ["--reserved-cpus", str(reserved_cpus)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"vLLM did not finish within {timeout_s:g} s; "
                                   f"see {log_path}") from None
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join(log_path.read_text().splitlines()[-15:])
            raise RuntimeError(f"vLLM exited with status {proc.returncode}; "
                               f"log {log_path} ends:\n{tail}")
        raw = json.loads(out_file.read_text())
    return {
        "wall_s": raw["wall_s"],
        "load_s": raw["load_s"],
        "warmup_s": raw["warmup_s"],
        "token_ids": raw["token_ids"],
        "extra": {"vllm_version": raw["vllm_version"],
                  "kv_cache_space_gib": raw["kv_cache_space_gib"],
                  "reserved_cpus": raw["reserved_cpus"],
                  "log": str(log_path)},
    }
