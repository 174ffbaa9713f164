"""Soak: mixed traffic with client aborts, disconnects and bad requests for a while,
then the books: every request answered as it should be, no KV block left held on
any worker, and no process growing past a bound.

Traffic, from --clients threads, each picking at random per request:

* whole: a completion or chat, read whole (its usage must match max_tokens);
* stream: a streamed completion read to its end ([DONE] and a finish_reason);
* abort: a stream the client closes after its first chunks (the router aborts it);
* disconnect: a raw HTTP request whose socket is dropped before the answer;
* bad: a malformed body or out-of-range field (must be a 4xx with an error body).

Memory: the resident size of every worker actor, router replica and the cluster
manager, sampled every few seconds; growth is measured from the end of the first
quarter (warm: caches and pools filled) to the end.

    python bench/soak.py --duration 1800          # the record run: its own local cluster
    python bench/soak.py --duration 120 --clients 4

Prints a summary and writes JSON (with the memory series) to
bench/results/soak-<timestamp>.json. The suite runs a short soak
(tests/e2e/test_soak.py) against its e2e cluster.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

KINDS = ("whole", "stream", "abort", "disconnect", "bad")
BAD_BODIES = (
    b"{not json",
    b'{"model": "tiny-llama", "prompt": "x", "temperature": -1}',
    b'{"model": "tiny-llama", "prompt": [1, 2, 99999999]}',
    b'{"model": "tiny-llama", "messages": []}',
    b'{"model": "tiny-llama", "prompt": "x", "max_tokens": "ten"}',
    b'{"model": "nope", "prompt": "x"}',
    b'[1, 2, 3]',
)
MEMORY_BOUND_MIB = 64.0  # growth allowed per process, plus ...
MEMORY_BOUND_FRACTION = 0.10  # ... this share of its warm size


class Traffic:
    def __init__(self, base_url: str, model: str, seed: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.problems: list[str] = []

    def one(self) -> None:
        with self.lock:
            kind = self.rng.choice(KINDS)
            seed = self.rng.randrange(10**6)
            self.sent[kind] += 1
        try:
            problem = getattr(self, f"_{kind}")(random.Random(seed))
        except Exception as e:  # noqa: BLE001 - any failure of a request is a finding
            problem = f"{type(e).__name__}: {e}"
        if problem:
            with self.lock:
                self.problems.append(f"{kind}: {problem}")

    def _body(self, rng: random.Random, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": rng.randint(4, 48), "temperature": 0,
                                "ignore_eos": True, "stream": stream}
        words = " ".join(rng.choice(("cache", "block", "token", "worker")) for _ in range(rng.randint(3, 60)))
        if rng.random() < 0.5:
            body["prompt"] = words
        else:
            body["messages"] = [{"role": "user", "content": words}]
        return body

    def _post(self, body: dict[str, Any]) -> urllib.request.Request:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        return urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})

    def _whole(self, rng: random.Random) -> Optional[str]:
        body = self._body(rng, stream=False)
        with urllib.request.urlopen(self._post(body), timeout=300) as r:
            usage = json.loads(r.read())["usage"]
        return None if usage["completion_tokens"] == body["max_tokens"] else f"usage {usage} for {body['max_tokens']}"

    def _stream(self, rng: random.Random) -> Optional[str]:
        with urllib.request.urlopen(self._post(self._body(rng, stream=True)), timeout=300) as r:
            lines = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
        finished = any('"finish_reason":"length"' in line for line in lines)
        return None if lines and lines[-1] == "data: [DONE]" and finished else f"stream ended as {lines[-2:]}"

    def _abort(self, rng: random.Random) -> Optional[str]:
        body = self._body(rng, stream=True)
        body["max_tokens"] = 400
        r = urllib.request.urlopen(self._post(body), timeout=300)
        r.readline()
        r.close()  # the client goes away mid-stream
        return None

    def _disconnect(self, rng: random.Random) -> Optional[str]:
        url = urllib.parse.urlparse(self.base_url)
        body = json.dumps({**self._body(rng, stream=rng.random() < 0.5), "max_tokens": 300}).encode()
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.putrequest("POST", url.path + "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        conn.sock.close()  # before any answer
        return None

    def _bad(self, rng: random.Random) -> Optional[str]:
        data = rng.choice(BAD_BODIES)
        request = urllib.request.Request(self.base_url + "/v1/completions", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return f"{data!r} was accepted ({r.status})"
        except urllib.error.HTTPError as e:
            error = json.loads(e.read()).get("error", {})
            return None if 400 <= e.code < 500 and error.get("message") else f"{data!r}: {e.code} {error}"


def rss_mib(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def yard_processes() -> dict[str, int]:
    """name → pid of every live worker actor, router replica and cluster manager."""
    # The GCS's actor table: the public state API needs Ray's dashboard, which a
    # local cluster may run without.
    from ray._private.state import actors

    out = {}
    for actor_id, actor in actors().items():
        name, cls = actor.get("Name") or "", actor.get("ActorClassName") or ""
        if actor.get("State") == "ALIVE" and (name.startswith("yard-") or "Replica" in cls and "router" in cls):
            out[f"{cls}:{name or actor_id[:8]}"] = actor["Pid"]
    return out


def books(manager: Any, ended_at: float, timeout_s: float = 120) -> dict[str, Any]:
    """Once every worker has reported since the traffic ended and is idle: per worker,
    its held blocks (total - free), which must be 0."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        loads = [s.load for s in ray.get(manager.snapshot.remote()) if s.load is not None]
        settled = all(r.reported_at > ended_at and not r.num_running and not r.num_waiting for r in loads)
        if (settled and loads) or time.monotonic() > deadline:
            return {r.worker_id: {"held_blocks": r.total_blocks - r.free_blocks, "running": r.num_running,
                                  "waiting": r.num_waiting} for r in loads}
        time.sleep(0.2)


def soak(base_url: str, model: str, manager: Any, duration_s: float, clients: int, seed: int = 0,
         sample_s: float = 2.0, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    traffic = Traffic(base_url, model, seed)
    stop = threading.Event()
    memory: dict[str, list[tuple[float, float]]] = {}
    start = time.monotonic()

    def client() -> None:
        while not stop.is_set():
            traffic.one()

    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
        try:
            while time.monotonic() - start < duration_s:
                for name, pid in yard_processes().items():
                    mib = rss_mib(pid)
                    if mib is not None:
                        memory.setdefault(name, []).append((round(time.monotonic() - start, 1), round(mib, 1)))
                log(f"{time.monotonic() - start:6.0f} s: {sum(traffic.sent.values())} requests, "
                    f"{len(traffic.problems)} problems")
                time.sleep(sample_s)
        finally:
            stop.set()  # the clients end with their current request
    ended_at = time.time()
    return {"duration_s": duration_s, "clients": clients, "sent": dict(traffic.sent),
            "problems": traffic.problems[:50], "num_problems": len(traffic.problems),
            "workers": books(manager, ended_at), "memory_growth": growth(memory, duration_s), "memory": memory}


def growth(memory: dict[str, list[tuple[float, float]]], duration_s: float) -> dict[str, dict[str, float]]:
    """Per process: its size once warm (the end of the first quarter), at the end,
    and whether the growth stays within the bound."""
    out = {}
    for name, series in memory.items():
        warm = [mib for t, mib in series if t >= duration_s / 4]
        if len(warm) < 2:
            continue
        bound = MEMORY_BOUND_MIB + MEMORY_BOUND_FRACTION * warm[0]
        out[name] = {"warm_mib": warm[0], "end_mib": warm[-1], "growth_mib": round(warm[-1] - warm[0], 1),
                     "bound_mib": round(bound, 1), "within": warm[-1] - warm[0] <= bound}
    return out


def main() -> None:
    from environment import write_results  # bench/environment.py

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of traffic (1800 for the record)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from cluster.serving import free_port, start, stop

    config = {"cluster": {"name": "soak", "num_workers": 2, "engine": {"model": args.model}},
              "router": {"served_model_name": "tiny-llama"},
              "http": {"host": "127.0.0.1", "port": free_port()}, "grpc": {"port": free_port()}}
    endpoints = start(config)
    try:
        manager = ray.get_actor("yard-manager-soak", namespace="yard")
        report = soak(endpoints["http"].removesuffix("/v1"), "tiny-llama", manager, args.duration, args.clients,
                      log=print)
    finally:
        stop(config)
    print(json.dumps({k: v for k, v in report.items() if k != "memory"}, indent=2))
    write_results(report, "soak", args.json)


if __name__ == "__main__":
    main()
