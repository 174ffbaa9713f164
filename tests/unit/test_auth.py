"""API keys and per-request limits, without a server."""

from __future__ import annotations

import asyncio

import pytest

from router.auth import ApiKeys, check_priority
from router.limits import RequestLimits, read_body
from router.openai_errors import APIError
from router.openai_protocol import parse_chat_request, parse_completion_request


def test_no_key_configured_means_open(monkeypatch):
    monkeypatch.delenv("YARD_TEST_KEYS", raising=False)
    keys = ApiKeys.load(None, "YARD_TEST_KEYS")
    assert not keys.required
    assert not keys.caller(None).may_set_priority
    assert ApiKeys.load(None, "YARD_TEST_KEYS", allow_priority=True).caller(None).may_set_priority


def test_keys_from_the_environment_and_a_file_with_grants(tmp_path, monkeypatch):
    monkeypatch.setenv("YARD_TEST_KEYS", "env-key-1, env-key-2\n")
    file = tmp_path / "keys"
    file.write_text("# team keys\nfile-key\nboss-key priority   # may preempt\n\n")
    keys = ApiKeys.load(str(file), "YARD_TEST_KEYS")
    assert keys.required
    assert not keys.caller("Bearer env-key-2").may_set_priority
    assert not keys.caller("bearer  file-key ").may_set_priority
    assert keys.caller("Bearer boss-key").may_set_priority
    for bad, message in ((None, "a valid API key is required"), ("Bearer nope", "not valid"),
                         ("Basic file-key", "a valid API key is required"), ("Bearer", "a valid API key")):
        with pytest.raises(APIError) as info:
            keys.caller(bad)
        assert info.value.status == 401 and message in info.value.message
        assert info.value.grpc_code == "UNAUTHENTICATED"


def test_a_keys_file_with_an_unknown_grant_is_refused_naming_the_line(tmp_path):
    file = tmp_path / "keys"
    file.write_text("good\nother admin\n")
    with pytest.raises(ValueError, match=r"line 2: unknown grants \['admin'\]"):
        ApiKeys.load(str(file), "YARD_TEST_KEYS_UNSET")


def test_priority_needs_a_grant():
    keys = ApiKeys({"k": frozenset()})
    check_priority(keys.caller("Bearer k"), 0)
    with pytest.raises(APIError) as info:
        check_priority(keys.caller("Bearer k"), 5)
    assert info.value.status == 403 and info.value.param == "priority" and "(5)" in info.value.message
    assert info.value.grpc_code == "PERMISSION_DENIED"


def test_prompt_and_output_limits_name_the_field():
    limits = RequestLimits(max_body_bytes=100, max_prompt_tokens=8, max_completion_tokens=20)
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                               "max_completion_tokens": 50}, ["m"])
    with pytest.raises(APIError) as info:
        limits.check_prompt(chat, 9)
    assert info.value.status == 413 and info.value.param == "messages" and "at most 8" in info.value.message
    limits.check_prompt(chat, 8)
    with pytest.raises(APIError) as info:
        limits.cap_output(chat, chat.resolve_sampling(4, 1000))
    assert info.value.status == 400 and info.value.param == "max_completion_tokens" and "50" in info.value.message
    unbounded = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ["m"])
    assert limits.cap_output(unbounded, unbounded.resolve_sampling(4, 1000)).max_tokens == 20
    small = parse_completion_request({"model": "m", "prompt": "x", "max_tokens": 20}, ["m"])
    assert limits.cap_output(small, small.resolve_sampling(1, 1000)).max_tokens == 20


class FakeRequest:
    def __init__(self, chunks: list[bytes], content_length: str | None = None) -> None:
        self.headers = {} if content_length is None else {"content-length": content_length}
        self.chunks = chunks
        self.read = 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole():
    limits = RequestLimits(max_body_bytes=10)
    assert asyncio.run(read_body(FakeRequest([b"12345", b"67890"]), limits)) == b"1234567890"
    declared = FakeRequest([b"x" * 5], content_length="11")
    with pytest.raises(APIError) as info:
        asyncio.run(read_body(declared, limits))
    assert info.value.status == 413 and declared.read == 0
    chunked = FakeRequest([b"x" * 6, b"x" * 6, b"x" * 6])
    with pytest.raises(APIError):
        asyncio.run(read_body(chunked, limits))
    assert chunked.read == 2
