"""API keys, request limits and priority grants on a second Serve application over
the e2e cluster; and a redeploy that would change the running cluster's settings."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import openai
import pytest
import yaml

from router.grpc_stubs import load

METADATA = (("application", "secure"),)


def post(url: str, body: bytes, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_healthy(url: str, timeout_s: float = 60) -> int:
    """Healthy workers, once /health says 200 (an earlier test may have just ended an
    outage: the replica's snapshot follows within a poll)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read())["healthy_workers"]
        except urllib.error.HTTPError as e:
            assert e.code == 503 and time.monotonic() < deadline, e
        time.sleep(0.1)


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0,
                       **fields}).encode()


def test_http_needs_a_key_except_for_health(secure_app):
    url = secure_app["base_url"] + "/v1/completions"
    for key in (None, "wrong-key"):
        code, body = post(url, completion(), key)
        assert code == 401 and body["error"]["code"] == "invalid_api_key", body
    assert wait_healthy(secure_app["base_url"] + "/health") == 2  # no key: open
    client = openai.OpenAI(base_url=secure_app["base_url"] + "/v1", api_key="team-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    got = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, temperature=0)
    assert got.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secure_app["base_url"] + "/v1", api_key="nope", max_retries=0).models.list()


def test_limits_name_the_field_and_the_limit(secure_app):
    url = secure_app["base_url"] + "/v1/completions"
    code, body = post(url, completion(prompt="x" * 5000), "team-key")
    assert code == 413 and body["error"]["code"] == "request_too_large" and "4096" in body["error"]["message"]
    code, body = post(url, completion(prompt=[5] * 65), "team-key")
    assert code == 413 and body["error"]["param"] == "prompt" and "at most 64" in body["error"]["message"]
    code, body = post(url, completion(max_tokens=33), "team-key")
    assert code == 400 and body["error"]["param"] == "max_tokens" and "at most 32" in body["error"]["message"]
    code, body = post(secure_app["base_url"] + "/v1/chat/completions", json.dumps(
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
         "temperature": 0, "ignore_eos": True}).encode(), "team-key")
    assert code == 200 and body["usage"]["completion_tokens"] == 32, body  # the default output is capped


def test_priority_needs_the_keys_grant(secure_app):
    url = secure_app["base_url"] + "/v1/completions"
    code, body = post(url, completion(priority=3), "team-key")
    assert code == 403 and body["error"]["param"] == "priority"
    code, body = post(url, completion(priority=3), "boss-key")
    assert code == 200 and body["usage"]["completion_tokens"] == 4


def test_grpc_needs_the_key_in_metadata(secure_app):
    stubs = load()
    pb2 = stubs.pb2
    request = pb2.GenerateRequest(model="tiny-llama", text="Hello",
                                  sampling=pb2.SamplingParams(temperature=0, max_tokens=3))
    with grpc.insecure_channel(secure_app["grpc_target"]) as channel:
        yard = stubs.pb2_grpc.YardStub(channel)
        assert yard.Health(pb2.HealthRequest(), metadata=METADATA, timeout=30).healthy_workers == 2
        for metadata in (METADATA, METADATA + (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as info:
                list(yard.Generate(request, metadata=metadata, timeout=60))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            yard.ListModels(pb2.ListModelsRequest(), metadata=METADATA, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        authorized = METADATA + (("authorization", "Bearer team-key"),)
        responses = list(yard.Generate(request, metadata=authorized, timeout=60))
        assert sum(len(r.token_ids) for r in responses) == 3
        request.priority = 2
        with pytest.raises(grpc.RpcError) as info:
            list(yard.Generate(request, metadata=authorized, timeout=60))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "priority" in info.value.details()


def test_a_redeploy_that_changes_the_running_clusters_settings_fails_naming_them(serve_app, tmp_path):
    from router.app import build_app

    args = serve_app["app_args"]
    values = yaml.safe_load(open(args["values_file"]))
    values["cluster"]["load_poll_interval_s"] = 0.3
    values["cluster"]["engine"]["block_size"] = 32
    changed = tmp_path / "values.yaml"
    changed.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError) as info:
        build_app({**args, "values_file": str(changed)})
    message = str(info.value)
    assert "cluster 'e2e' is already running with other settings" in message
    assert "load_poll_interval_s: 0.2 -> 0.3" in message and "engine.block_size: 16 -> 32" in message
    assert "yard stop --cluster e2e" in message
