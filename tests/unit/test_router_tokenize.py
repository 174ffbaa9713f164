"""Where a router replica tokenizes a prompt: a short one on its event loop, a long one
on its tokenizing thread, and never both at once (a tokenizer is not safe to share
between threads)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Optional

from conditions import wait_until
from router.core import INLINE_PROMPT_CHARS, INLINE_PROMPT_TOKEN_IDS, RouterCore, tokenize_inline
from router.openai_protocol import parse_chat_request, parse_completion_request


def completion(prompt: Any):
    return parse_completion_request({"model": "m", "prompt": prompt}, ["m"])


def chat(content: str):
    return parse_chat_request({"model": "m", "messages": [{"role": "user", "content": content}]}, ["m"])


class Tokenizing:
    """RouterCore's tokenizing state, with a tokenize that records its thread and can be
    held mid-way."""

    def __init__(self) -> None:
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._last_tokenizing: Optional[concurrent.futures.Future] = None
        self.threads: list[str] = []
        self.inside = 0  # tokenize calls running now
        self.most_inside = 0
        self.hold = threading.Event()
        self.hold.set()

    def tokenize(self, gen: Any) -> list[int]:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        self.threads.append(threading.current_thread().name)
        self.hold.wait(5)  # held on the loop (a bug), it lets go, and most_inside shows it
        self.inside -= 1
        return [len(gen.prompt if gen.prompt is not None else gen.messages)]

    async def tokens(self, gen: Any) -> list[int]:
        return await RouterCore._tokens(self, gen)


def test_short_prompts_are_tokenized_inline_and_long_ones_are_not() -> None:
    assert tokenize_inline(completion("a" * INLINE_PROMPT_CHARS))
    assert not tokenize_inline(completion("a" * (INLINE_PROMPT_CHARS + 1)))
    assert tokenize_inline(completion([1] * INLINE_PROMPT_TOKEN_IDS))
    assert not tokenize_inline(completion([1] * (INLINE_PROMPT_TOKEN_IDS + 1)))
    assert tokenize_inline(chat("a" * INLINE_PROMPT_CHARS))
    assert not tokenize_inline(chat("a" * (INLINE_PROMPT_CHARS + 1)))


def test_a_short_prompt_runs_on_the_loop_and_a_long_one_on_the_thread() -> None:
    t = Tokenizing()

    async def both() -> tuple[list[int], list[int]]:
        return await t.tokens(completion("short")), await t.tokens(completion("x" * (INLINE_PROMPT_CHARS + 1)))

    short, long = asyncio.run(both())
    assert (short, long) == ([5], [INLINE_PROMPT_CHARS + 1])
    assert t.threads[0] == threading.main_thread().name and t.threads[1].startswith("tokenize")


def test_a_short_prompt_waits_for_the_thread_while_it_tokenizes() -> None:
    """While a long prompt is on the thread, a short one queues behind it there
    instead of using the tokenizer on the loop at the same time."""
    t = Tokenizing()
    t.hold.clear()

    async def scenario() -> list[list[int]]:
        long = asyncio.ensure_future(t.tokens(completion("x" * (INLINE_PROMPT_CHARS + 1))))
        await asyncio.sleep(0)  # it reaches the thread
        wait_until(lambda: t.inside == 1, 10, "the long prompt to be tokenizing on the thread")
        short = asyncio.ensure_future(t.tokens(completion("short")))
        await asyncio.sleep(0)
        t.hold.set()
        return [await long, await short]

    assert asyncio.run(scenario()) == [[INLINE_PROMPT_CHARS + 1], [5]]
    assert t.most_inside == 1
    assert all(name.startswith("tokenize") for name in t.threads)
