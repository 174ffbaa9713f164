"""How a worker batches the events of a channel: first and last events at once, the
tokens in between at most every interval (a share of it while few requests stream),
every batch taking all that is pending; and how a batch merges each request's tokens."""

from __future__ import annotations

import asyncio

import pytest

from workers.events import Failed, Finished, Tokens, Usage
from workers.channel import Channel, coalesce

HELD = 0.05  # how long the tests wait to see that a batch is held back


def tok(rid: str, index: int, *ids: int) -> Tokens:
    return Tokens(rid, index, ids, "".join(chr(97 + i % 26) for i in ids))


async def released_within(channel: Channel, seconds: float):
    try:
        return await asyncio.wait_for(channel.next_batch(), seconds)
    except asyncio.TimeoutError:
        return None


def test_first_event_goes_at_once_then_tokens_wait_for_the_interval():
    async def scenario():
        channel = Channel("c", interval_s=30.0)
        channel.deliver(tok("a", 0, 1))
        first = await released_within(channel, HELD)
        channel.deliver(tok("a", 1, 2))
        channel.deliver(tok("a", 2, 3))
        held = await released_within(channel, HELD)
        channel.deliver(tok("b", 0, 9))  # b's first token: out at once, a's ride along
        together = await released_within(channel, HELD)
        return first, held, together
    first, held, together = asyncio.run(scenario())
    assert first == [tok("a", 0, 1)]
    assert held is None
    assert together == [tok("a", 1, 2), tok("a", 2, 3), tok("b", 0, 9)]


def after_first_batch(interval_s: float, *then: object, wait_s: float = HELD):
    """What a channel releases within wait_s of the events `then`, delivered after
    request a's first token has gone out."""
    async def scenario():
        channel = Channel("c", interval_s=interval_s)
        channel.deliver(tok("a", 0, 1))
        await channel.next_batch()
        for event in then:
            channel.deliver(event)
        return await released_within(channel, wait_s)
    return asyncio.run(scenario())


def test_last_event_goes_at_once():
    done = Finished("a", "length", None, Usage(1, 2))
    assert after_first_batch(30.0, tok("a", 1, 2), done) == [tok("a", 1, 2), done]


def test_tokens_go_once_the_interval_has_passed():
    assert after_first_batch(0.02, tok("a", 1, 2), wait_s=5.0) == [tok("a", 1, 2)]


def test_zero_interval_sends_every_delivery():
    assert after_first_batch(0.0, tok("a", 1, 2)) == [tok("a", 1, 2)]


def testcoalesce_merges_each_requests_tokens_in_order():
    batch = [tok("a", 0, 1), tok("b", 4, 7), tok("a", 1, 2), tok("b", 5, 8),
             Finished("b", "stop", None, Usage(3, 6)), tok("a", 2, 3), Failed("c", "invalid_request", "bad")]
    assert coalesce(batch) == [tok("a", 0, 1, 2, 3), tok("b", 4, 7, 8), Finished("b", "stop", None, Usage(3, 6)),
                                Failed("c", "invalid_request", "bad")]


def test_a_first_token_without_text_keeps_the_next_one_urgent():
    async def scenario():
        channel = Channel("c", interval_s=30.0)
        channel.deliver(Tokens("a", 0, (7,), ""))  # ends inside a UTF-8 character
        first = await released_within(channel, HELD)
        channel.deliver(Tokens("a", 1, (8,), "é"))
        visible = await released_within(channel, HELD)
        channel.deliver(tok("a", 2, 3))
        held = await released_within(channel, HELD)
        return first, visible, held
    first, visible, held = asyncio.run(scenario())
    assert first == [Tokens("a", 0, (7,), "")]
    assert visible == [Tokens("a", 1, (8,), "é")]
    assert held is None


def test_the_interval_follows_the_requests_streaming_up_to_its_maximum():
    channel = Channel("c", interval_s=0.05, full_at=50, max_interval_s=0.2)
    assert channel.interval == 0.0  # nothing streams: the first token goes at once anyway
    channel.requests.update(f"r{i}" for i in range(10))
    assert channel.interval == 0.05 * 10 / 50
    channel.requests.update(f"s{i}" for i in range(40))
    assert channel.interval == 0.05
    channel.requests.update(f"t{i}" for i in range(100))  # 150 streaming: a third of the chunks each
    assert channel.interval == pytest.approx(0.15)
    channel.requests.update(f"u{i}" for i in range(100))
    assert channel.interval == 0.2
    assert Channel("c", interval_s=0.05).interval == 0.05  # full_at 0: always the whole interval


def test_without_a_maximum_the_interval_stops_at_interval_s():
    channel = Channel("c", interval_s=0.05, full_at=50)
    channel.requests.update(f"r{i}" for i in range(200))
    assert channel.interval == 0.05


def test_a_few_requests_streaming_get_their_tokens_sooner_than_many():
    async def scenario(streaming: int):
        channel = Channel("c", interval_s=30.0, full_at=3000)  # 10 ms per request streaming
        channel.requests.update(["a"] + [f"r{i}" for i in range(streaming - 1)])
        channel.deliver(tok("a", 0, 1))
        await channel.next_batch()
        channel.deliver(tok("a", 1, 2))
        return await released_within(channel, 1.0)
    assert asyncio.run(scenario(1)) == [tok("a", 1, 2)]
    assert asyncio.run(scenario(3000)) is None  # the whole 30 s applies
