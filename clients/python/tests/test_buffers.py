"""The result buffer and the results streams, fed by hand without a broker: their bounds (in
results and in bytes), and what a stream that falls behind does to everyone else."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from queue_worker import Client, JobResult, Names, QueueWorkerError, Status, StreamOverflow


def make_client(**options: Any) -> Client:
    """A listening client without a connection: results go in through ``_deliver``."""
    settings: dict[str, Any] = {
        "queue_type": "quorum",
        "declare": False,
        "result_buffer": 100,
        "stream_buffer": 100,
        "confirm_timeout": 5,
        "window": 4,
    }
    settings.update(options)
    client = Client(None, Names("ns"), **settings)  # type: ignore[arg-type]
    client._listening = True
    return client


def a_result(n: int = 0) -> JobResult:
    return JobResult(uuid.uuid4(), "k", Status.OK, {"n": n}, None, 1, datetime.now(UTC))


async def test_a_stream_that_falls_behind_is_detached_and_holds_nobody_up() -> None:
    client = make_client(stream_buffer=3)
    stalled = client.results()  # never read until the end
    reader = client.results()
    results = [a_result(i) for i in range(10)]
    waiting = asyncio.ensure_future(client.result(results[-1].job_id, timeout=5))
    await asyncio.sleep(0)
    async with asyncio.timeout(5):  # delivering used to wait here for the stalled stream, for ever
        for result in results:
            await client._deliver(result, 100)
            assert await reader.__anext__() is result
        assert await waiting is results[-1]
    assert list(client._streams) == [reader], "the stalled stream is detached, the reader is not"
    # The stalled stream still yields what it held, in order, then says where its gap begins.
    got: list[JobResult] = []
    with pytest.raises(StreamOverflow) as raised:
        async for result in stalled:
            got.append(result)
    assert got == results[:3]
    overflow = raised.value
    assert isinstance(overflow, QueueWorkerError)
    assert overflow.job_id == results[3].job_id
    assert (overflow.waiting, overflow.waiting_bytes, overflow.maxsize) == (3, 300, 3)
    assert "stream_buffer" in str(overflow)
    assert [r async for r in stalled] == [], "raised once; then the stream ends"
    # What it missed reached the buffer as usual.
    assert all(client.try_result(r.job_id) is r for r in results)
    await reader.aclose()
    assert not client._streams


async def test_a_stream_is_bounded_in_bytes_too() -> None:
    client = make_client(stream_buffer=100, max_stream_bytes=1_000)
    stream = client.results()
    first, second, third = a_result(1), a_result(2), a_result(3)
    await client._deliver(first, 400)
    await client._deliver(second, 400)
    await client._deliver(third, 400)  # 1,200 bytes would be over 1,000
    assert not client._streams
    assert await stream.__anext__() is first
    assert await stream.__anext__() is second
    with pytest.raises(StreamOverflow) as raised:
        await stream.__anext__()
    assert raised.value.job_id == third.job_id
    assert (raised.value.waiting, raised.value.waiting_bytes, raised.value.max_bytes) == (2, 800, 1_000)
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()

    # One result larger than the bound still goes into an empty stream: a stream that is
    # read keeps working whatever the size of the results.
    stream = client.results()
    huge = a_result(4)
    await client._deliver(huge, 5_000)
    assert await stream.__anext__() is huge
    await client._deliver(huge, 5_000)
    await client._deliver(a_result(5), 1)  # but nothing goes in after it
    assert not client._streams
    assert await stream.__anext__() is huge
    with pytest.raises(StreamOverflow):
        await stream.__anext__()


async def test_a_reader_waiting_on_a_stream_wakes_for_a_result_and_for_the_end() -> None:
    client = make_client()
    stream = client.results()
    result = a_result()
    reading = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    await client._deliver(result, 10)
    assert await asyncio.wait_for(reading, 1) is result
    reading = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reading, 1)


async def test_the_result_buffer_is_bounded_in_bytes() -> None:
    client = make_client(result_buffer=100, max_buffer_bytes=1_000)
    results = [a_result(i) for i in range(10)]
    for result in results:
        await client._deliver(result, 300)
    # The oldest go first: three of 300 bytes fit in 1,000.
    assert [client.try_result(r.job_id) for r in results] == [None] * 7 + results[7:]
    assert client._buffer_bytes == 900
    # The same result again (at-least-once) is counted once.
    await client._deliver(results[-1], 300)
    assert client._buffer_bytes == 900 and len(client._buffer) == 3

    # A result larger than the bound is kept anyway (the newest always is), alone...
    huge = a_result(10)
    waiting = asyncio.ensure_future(client.result(huge.job_id, timeout=5))
    await asyncio.sleep(0)
    await client._deliver(huge, 5_000)
    assert await waiting is huge, "a waiter gets its result whatever the buffer's bounds"
    assert list(client._buffer) == [huge.job_id] and client._buffer_bytes == 5_000
    assert await client.result(huge.job_id, timeout=0.1) is huge
    # ... until the next one comes.
    small = a_result(11)
    await client._deliver(small, 10)
    assert list(client._buffer) == [small.job_id] and client._buffer_bytes == 10

    # Without a size, the result's encoded size counts.
    other = a_result(12)
    await client._deliver(other)
    assert client._buffer_bytes == 10 + len(other.to_bytes())


async def test_the_result_buffer_keeps_its_count_bound() -> None:
    client = make_client(result_buffer=2)
    results = [a_result(i) for i in range(5)]
    for result in results:
        await client._deliver(result, 1)
    assert list(client._buffer) == [r.job_id for r in results[3:]]
    assert client._buffer_bytes == 2


@pytest.mark.parametrize("option", ["max_buffer_bytes", "max_stream_bytes"])
async def test_byte_bounds_must_be_positive(option: str) -> None:
    with pytest.raises(ValueError, match=option):
        await Client.connect("amqp://guest:guest@127.0.0.1:1/%2f", "ns", **{option: 0})
