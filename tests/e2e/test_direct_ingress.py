"""`yard serve --ingress direct`: the router replica itself listens on the HTTP and gRPC
ports (Serve's direct ingress). Run as users run it, in its own process and its own
Ray, and checked against the offline engine through both APIs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import openai
import pytest

from cluster.serving import free_port
from router.grpc_stubs import load
from workers import LLM, SamplingParams

PROMPT = "The quick brown fox"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)



def wait_until_healthy(url: str, server: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"yard serve exited with {server.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


@pytest.fixture(scope="module")
def direct_server(make_model, tmp_path_factory):
    model = str(make_model("tiny-llama"))
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("direct") / "serve.log"
    # RAY_ADDRESS=local: a Ray of its own, started with the direct ingress settings,
    # not the test session's.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--model", model, "--workers", "1", "--ingress", "direct",
             "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(f"http://127.0.0.1:{http_port}/health", server)
        yield {"http": f"http://127.0.0.1:{http_port}/v1", "grpc": f"127.0.0.1:{grpc_port}", "model": model,
               "ports": (http_port, grpc_port)}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        print(log.read_text()[-3000:])


def listener(port: int) -> str:
    """The name of the process listening on `port` (Linux's `ss`; Ray names its
    processes after the actor: ray::ServeReplica:..., ray::ProxyActor)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return out


def test_http_and_grpc_served_by_the_router_replica_itself(direct_server):
    for port in direct_server["ports"]:  # the replica took the ports, not Serve's proxy
        owner = listener(port)
        assert "ServeRepli" in owner and "ProxyActor" not in owner, owner
    expected = LLM(model=direct_server["model"]).generate(PROMPT, GREEDY)[0]
    client = openai.OpenAI(base_url=direct_server["http"], api_key="unused", max_retries=0)
    stream = client.completions.create(model=direct_server["model"], prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text

    stubs = load()
    with grpc.insecure_channel(direct_server["grpc"]) as channel:
        request = stubs.pb2.GenerateRequest(model=direct_server["model"], text=PROMPT,
                                            sampling=stubs.pb2.SamplingParams(temperature=0, max_tokens=12,
                                                                              ignore_eos=True))
        replies = list(stubs.pb2_grpc.YardStub(channel).Generate(request, metadata=(("application", "yard"),)))
    assert [t for r in replies for t in r.token_ids] == expected.token_ids
    assert "".join(r.text for r in replies) == expected.text
