"""Bad input while a load is in flight, and load shedding with 429 + Retry-After."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import openai

from workers import LLM, SamplingParams


def post(base_url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def test_bad_input_does_not_disturb_requests_in_flight(serve_app):
    client = openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)
    params = dict(model="tiny-llama", prompt="In the beginning", max_tokens=300, temperature=0,
                  extra_body={"ignore_eos": True})
    expected = LLM(model=serve_app["model_dir"]).generate(
        "In the beginning", SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))[0].text
    stream = client.completions.create(stream=True, **params)
    first = next(iter(stream))
    bad = [post(serve_app["base_url"], body)[0] for body in (
        {"model": "tiny-llama", "prompt": "x", "top_p": 0},
        {"model": "tiny-llama", "prompt": [1, 10**6]},
        {"model": "other", "prompt": "x"},
        {"model": "tiny-llama", "prompt": "x", "stop": [""]},
    )]
    assert bad == [422, 422, 404, 422]
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
    assert text == expected


def test_saturated_cluster_sheds_with_429(serve_app):
    # The app allows 8 queued requests per worker and has 2 workers: a burst of 40
    # long requests must see some 429s, and every accepted one must finish whole.
    body = {"model": "tiny-llama", "prompt": "Tell me everything", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(lambda _: post(serve_app["base_url"], body), range(40)))
    shed = [(h, b) for code, h, b in results if code == 429]
    done = [b for code, _, b in results if code == 200]
    assert shed and done
    assert len(shed) + len(done) == 40
    assert all(h.get("retry-after") == "1" and b["error"]["code"] == "overloaded" for h, b in shed)
    assert all(b["usage"]["completion_tokens"] == 200 for b in done)
