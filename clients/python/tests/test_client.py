"""The client against a real broker and the real Rust consumer."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from datetime import timedelta

import aio_pika
import aiormq
import pytest
import yarl
from helpers import AMQP_URL, Consumer, start_consumer, stop_consumer, wait_ready

from queue_worker import (
    BrokerError,
    Client,
    ConnectFailed,
    Job,
    JobFailed,
    JobRejected,
    JobResult,
    QueueWorkerError,
    ResultTimeout,
    Status,
    StreamOverflow,
    TopologyError,
)
from queue_worker._time import format_rfc3339, parse_rfc3339
from queue_worker.testing import delete_namespace, fresh_namespace


async def test_one_job_gets_its_ok_result(client: Client) -> None:
    async with asyncio.timeout(30):
        job_id = await client.submit("text.analyze", {"text": "hello world"})
        assert isinstance(job_id, uuid.UUID)
        result = await client.result(job_id, timeout=20)
    assert result.job_id == job_id
    assert result.kind == "text.analyze"
    assert result.status is Status.OK and result.ok
    assert result.raise_for_status() is result
    assert result.output["words"] == 2
    assert result.output["top_words"] == [["hello", 1], ["world", 1]]
    assert result.error is None
    assert result.attempts == 1
    assert [s.name for s in result.stages] == ["decode", "analyze", "digest"]
    assert result.job_created_at is not None and result.latency is not None and result.latency >= 0
    assert result.hops == 0
    # A later call finds it in the buffer.
    assert (await client.result(job_id, timeout=0.1)) is result
    assert client.try_result(job_id) is result


async def test_results_from_the_rust_consumer_round_trip(client: Client, consumer: Consumer) -> None:
    """Raw result bodies as the consumer publishes them parse and serialize back to the same
    JSON (times compared at microsecond precision, which is what Python holds)."""
    connection = await aio_pika.connect(consumer.url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(client.names.results_exchange, routing_key="#")
        async with asyncio.timeout(30):
            ok = await client.submit("text.analyze", {"text": "Raw bodies, raw bodies."})
            failed = await client.submit("text.analyze", {"nope": 1})
            raw: dict[uuid.UUID, bytes] = {}
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    body = json.loads(message.body)
                    assert message.content_type == "application/json"
                    assert message.message_id == message.correlation_id == body["job_id"]
                    assert message.routing_key == "text.analyze"
                    raw[uuid.UUID(body["job_id"])] = message.body
                    if {ok, failed} <= raw.keys():
                        break
    finally:
        await connection.close()
    for job_id in (ok, failed):
        expected = json.loads(raw[job_id])
        for key in ("finished_at", "job_created_at"):
            expected[key] = format_rfc3339(parse_rfc3339(expected[key]))
        assert json.loads(JobResult.from_json(raw[job_id]).to_json()) == expected


async def test_submit_many_and_every_result_through_the_stream(client: Client) -> None:
    n = 1_000
    async with asyncio.timeout(90):
        stream = client.results()
        started = time.monotonic()
        ids = await client.submit_many(("text.analyze", {"text": f"job number {i}"}) for i in range(n))
        submitted = time.monotonic() - started
        assert len(ids) == n and len(set(ids)) == n
        wanted = set(ids)
        got: dict[uuid.UUID, JobResult] = {}
        async with stream:
            async for result in stream:
                if result.job_id in wanted:
                    got[result.job_id] = result
                    if len(got) == n:
                        break
        took = time.monotonic() - started
    print(f"\n{n} jobs: submitted in {submitted:.2f} s, every result in {took:.2f} s")
    assert set(got) == wanted
    assert all(r.ok and r.output["words"] == 3 for r in got.values())
    # Results that went through the stream are in the buffer too.
    assert (await client.result(ids[-1], timeout=0.1)).job_id == ids[-1]


async def test_submit_many_takes_jobs_with_their_own_ids(client: Client) -> None:
    jobs = [Job("text.analyze", {"text": "a b c d"}, id=uuid.uuid4()) for _ in range(3)]
    async with asyncio.timeout(30):
        ids = await client.submit_many([*jobs, ("text.analyze", {"text": "e"})])
        assert ids[:3] == [j.id for j in jobs]
        results = await client.wait_all(ids, timeout=20)
    assert [results[i].output["words"] for i in ids] == [4, 4, 4, 1]


async def test_a_delayed_job_runs_no_earlier_than_its_delay(client: Client) -> None:
    async with asyncio.timeout(30):
        started = time.monotonic()
        job_id = await client.submit("text.analyze", {"text": "later please"}, delay=2)
        result = await client.result(job_id, timeout=20)
        waited = time.monotonic() - started
    assert result.ok
    assert waited >= 2.0, waited
    assert result.job_created_at is not None
    assert result.finished_at - result.job_created_at >= timedelta(seconds=2)
    print(f"\ndelay 2 s: result after {waited:.3f} s")


async def test_an_invalid_payload_fails_and_raise_for_status_raises(client: Client) -> None:
    async with asyncio.timeout(30):
        job_id = await client.submit("text.analyze", {"nope": 1})
        result = await client.result(job_id, timeout=20)
    assert result.status is Status.FAILED and not result.ok
    assert result.output is None
    assert result.error is not None and result.error.startswith("invalid payload")
    with pytest.raises(JobFailed) as raised:
        result.raise_for_status()
    assert raised.value.result is result
    assert raised.value.job_id == job_id
    assert "invalid payload" in str(raised.value)


async def test_the_result_of_an_unknown_id_times_out(client: Client) -> None:
    started = time.monotonic()
    with pytest.raises(ResultTimeout) as raised:
        await client.result(uuid.uuid4(), timeout=0.5)
    took = time.monotonic() - started
    assert 0.45 <= took < 2.0, took
    assert isinstance(raised.value, TimeoutError)
    assert not client._waiters, "a timed-out wait leaves nothing behind"


@pytest.mark.parametrize("kind", ["", "x" * 256, "é" * 128, "bad\nkind", "tab\there", "nul\x00", "c1\x85"])
async def test_a_bad_kind_is_refused_before_anything_is_sent(client: Client, kind: str) -> None:
    with pytest.raises(ValueError, match="kind"):
        await client.submit(kind, {"text": "x"})
    with pytest.raises(ValueError, match="kind"):
        await client.submit_many([("text.analyze", {}), (kind, {})])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": -1}, "negative"),
        ({"delay": 367 * 86_400}, "longest"),
        ({"delay": timedelta(days=367)}, "longest"),
        ({"delay": float("nan")}, "finite"),
        ({"delay": "5s"}, "seconds or a timedelta"),
        ({"id": "not-a-uuid"}, "must be a UUID"),
    ],
)
async def test_bad_options_are_refused(client: Client, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await client.submit("text.analyze", {"text": "x"}, **options)


async def test_a_payload_json_cannot_carry_is_refused(client: Client) -> None:
    with pytest.raises(ValueError, match="JSON"):
        await client.submit("text.analyze", {"text": float("inf")})
    with pytest.raises(ValueError, match="JSON"):
        await client.submit("text.analyze", {"text": object()})


async def test_two_streams_see_the_same_results(client: Client) -> None:
    async with asyncio.timeout(30):
        first, second = client.results(), client.results()
        ids = set(await client.submit_many([("text.analyze", {"text": "x"})] * 5))

        async def collect(stream) -> set[uuid.UUID]:  # type: ignore[no-untyped-def]
            seen: set[uuid.UUID] = set()
            async for result in stream:
                seen.add(result.job_id)
                if ids <= seen:
                    break
            return seen & ids

        assert await collect(first) == ids
        assert await collect(second) == ids
        await first.aclose()
        await second.aclose()
    assert not client._streams


async def test_a_resubmitted_id_gets_a_result_again(client: Client) -> None:
    async with asyncio.timeout(30):
        job_id = uuid.uuid4()
        assert await client.submit("text.analyze", {"text": "one"}, id=job_id) == job_id
        assert (await client.result(job_id, timeout=20)).output["words"] == 1


def cannot_run(why: str) -> None:
    """Skips the test, or fails it when ``QW_REQUIRE_RABBITMQCTL`` is set (CI sets it: the
    broker there is local, so a test that cannot reach it is broken, not skipped)."""
    if os.environ.get("QW_REQUIRE_RABBITMQCTL"):
        pytest.fail(f"QW_REQUIRE_RABBITMQCTL is set but: {why}")
    pytest.skip(why)


def close_connections_named(name: str) -> int:
    """Closes the broker's connections whose client properties mention ``name`` (with
    rabbitmqctl, so only on a local broker run by this machine); returns how many."""
    if shutil.which("rabbitmqctl") is None:
        cannot_run("rabbitmqctl is not installed here")
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if listed.returncode != 0:
        cannot_run(f"rabbitmqctl cannot list connections: {listed.stderr.strip()[:200]}")
    pids = [line.split("\t")[0] for line in listed.stdout.splitlines() if name in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: connection lost"], check=True, timeout=30)
    return len(pids)


async def test_a_lost_connection_is_resumed(consumer: Consumer) -> None:
    """The broker closes the client's connection: the robust connection comes back, the next
    submit goes through, and its result arrives through the same stream."""
    name = f"qw-test-{uuid.uuid4().hex}"
    async with asyncio.timeout(60):
        async with await Client.connect(consumer.url, consumer.namespace, connection_name=name) as client:
            stream = client.results()
            first = await client.submit("text.analyze", {"text": "before"})
            assert (await client.result(first, timeout=20)).ok
            if await asyncio.to_thread(close_connections_named, name) != 1:
                cannot_run("the broker does not list this client's connection")
            second = await client.submit("text.analyze", {"text": "after the loss"})
            assert (await client.result(second, timeout=20)).ok
            async for result in stream:
                if result.job_id == second:
                    break
            await stream.aclose()


async def test_connecting_to_a_namespace_nobody_declared_fails_clearly() -> None:
    with pytest.raises(TopologyError, match="does not exist"):
        await Client.connect(AMQP_URL, fresh_namespace("py-missing"))


async def test_an_unroutable_job_is_rejected() -> None:
    """A jobs exchange without its alternate exchange and queues: the mandatory publish is
    returned, and the client says so."""
    namespace = fresh_namespace("py-unroutable")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(f"{namespace}.jobs", aio_pika.ExchangeType.TOPIC, durable=True)
        async with asyncio.timeout(30):
            async with await Client.connect(AMQP_URL, namespace, listen=False) as client:
                with pytest.raises(JobRejected, match="unroutable") as raised:
                    await client.submit("text.analyze", {"text": "nowhere"})
                assert isinstance(raised.value.job_id, uuid.UUID)
                with pytest.raises(JobRejected) as many:
                    await client.submit_many([("text.analyze", {"text": "x"})] * 10)
                assert len(many.value.failed) == 10 and many.value.confirmed == []
                # The client is still usable after returns.
                with pytest.raises(JobRejected):
                    await client.submit("text.analyze", {"text": "still nowhere"})
    finally:
        await connection.close()
        await delete_namespace(AMQP_URL, namespace)


async def test_declare_makes_a_namespace_the_rust_consumer_accepts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With ``declare=True`` the client declares the topology (and the delay ladder) on a
    fresh namespace; jobs wait in ``jobs.work`` and the ladder until a consumer starts, which
    must accept every queue as declared (same arguments: no "keeping its own" warning) and run
    them."""
    namespace = fresh_namespace("py-declare")
    consumer: Consumer | None = None
    try:
        async with asyncio.timeout(90):
            async with await Client.connect(AMQP_URL, namespace, declare=True) as client:
                plain = await client.submit("text.analyze", {"text": "waited for a consumer"})
                delayed = await client.submit("text.analyze", {"text": "delayed"}, delay=1)
                consumer = start_consumer(namespace, tmp_path / "consumer.log")
                results = await client.wait_all([plain, delayed], timeout=60)
                assert all(r.ok for r in results.values())
            await wait_ready(consumer)
        log = consumer.log.read_text(errors="replace")
        assert "declared with another argument" not in log, consumer.log_tail()
        assert "ERROR" not in log, consumer.log_tail()
    finally:
        if consumer is not None:
            stop_consumer(consumer)
        await delete_namespace(AMQP_URL, namespace)


async def test_a_closed_client_fails_pending_waits() -> None:
    namespace = fresh_namespace("py-close")
    try:
        async with asyncio.timeout(30):
            client = await Client.connect(AMQP_URL, namespace, declare=True)
            waiting = asyncio.ensure_future(client.result(uuid.uuid4(), timeout=20))
            stream = client.results()
            await asyncio.sleep(0.05)
            await client.close()
            with pytest.raises(Exception, match="closed"):
                await waiting
            assert [r async for r in stream] == []
            await client.close()  # idempotent
    finally:
        await delete_namespace(AMQP_URL, namespace)


async def test_a_results_stream_nobody_reads_does_not_stall_the_client(consumer: Consumer) -> None:
    """A stream that is never read fills up: it is detached with StreamOverflow, while the
    waiters and the other stream get every result (the listener used to stop at the stalled
    stream, and every wait timed out)."""
    async with asyncio.timeout(60):
        async with await Client.connect(consumer.url, consumer.namespace, stream_buffer=5) as client:
            stalled = client.results()
            reader = client.results()
            jobs = [client.new_job("text.analyze", {"text": f"job {i}"}) for i in range(30)]
            ids = [job.id for job in jobs]

            async def read_all() -> list[JobResult]:
                """Every result (others of the namespace too) in arrival order, until ours."""
                seen: list[JobResult] = []
                wanted = set(ids)
                async for result in reader:
                    seen.append(result)
                    wanted.discard(result.job_id)
                    if not wanted:
                        break
                return seen

            reading = asyncio.ensure_future(read_all())
            assert await client.submit_many(jobs) == ids
            results = await client.wait_all(ids, timeout=30)
            assert set(results) == set(ids)
            seen = await reading
            assert reader in client._streams and stalled not in client._streams
            got = []
            with pytest.raises(StreamOverflow) as raised:
                async for result in stalled:
                    got.append(result)
            assert [r.job_id for r in got] == [r.job_id for r in seen[:5]]
            assert raised.value.job_id == seen[5].job_id
            await reader.aclose()


async def test_the_result_buffer_is_bounded_in_bytes_but_waiters_get_every_result(consumer: Consumer) -> None:
    """With a buffer of 2 KiB (a few results of ~500 bytes), waiting for 20 results gets them
    all (waiters are handed their result on arrival), and the buffer keeps only the newest
    within 2 KiB."""
    bound = 2_048
    async with asyncio.timeout(60):
        async with await Client.connect(consumer.url, consumer.namespace, max_buffer_bytes=bound) as client:
            jobs = [client.new_job("text.analyze", {"text": " ".join(f"w{i}x{k}" for k in range(30))}) for i in range(20)]
            ids = [job.id for job in jobs]
            stream = client.results()
            waiting = asyncio.ensure_future(client.wait_all(ids, timeout=30))
            await asyncio.sleep(0.1)  # its result() calls are waiting before the first job goes
            assert set(client._waiters) == set(ids)
            assert await client.submit_many(jobs) == ids
            results = await waiting
            assert set(results) == set(ids) and all(r.ok for r in results.values())
            arrived: list[uuid.UUID] = []
            async with stream:
                async for result in stream:
                    if result.job_id in results:
                        arrived.append(result.job_id)
                        if len(arrived) == len(ids):
                            break
            assert 0 < client._buffer_bytes <= bound
            assert client._buffer_bytes == sum(size for _, size in client._buffer.values())
            kept = [i for i in ids if client.try_result(i) is not None]
            assert 1 <= len(kept) < len(ids)
            assert client.try_result(arrived[-1]) is results[arrived[-1]], "the newest is kept"
            assert client.try_result(arrived[0]) is None, "the oldest went first"


async def test_a_publish_the_broker_refuses_raises_broker_error() -> None:
    """The jobs exchange is internal: the broker refuses every publish to it and closes the
    channel (403 ACCESS_REFUSED). The client raises its own BrokerError (the aiormq error as
    its cause), not aiormq's, and stays usable."""
    namespace = fresh_namespace("py-refused")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(f"{namespace}.jobs", aio_pika.ExchangeType.TOPIC, durable=True, internal=True)
        async with asyncio.timeout(30):
            async with await Client.connect(AMQP_URL, namespace, listen=False) as client:
                for _ in range(2):  # the channel comes back: the second publish is refused too
                    with pytest.raises(BrokerError, match="ACCESS_REFUSED") as raised:
                        await client.submit("text.analyze", {"text": "not here"})
                    assert isinstance(raised.value.__cause__, aiormq.exceptions.ChannelAccessRefused)
                with pytest.raises(JobRejected) as many:
                    await client.submit_many([("text.analyze", {"text": "x"})] * 5)
                assert len(many.value.failed) == 5 and many.value.confirmed == []
                assert all(isinstance(e, BrokerError) for e in many.value.failed.values())
                assert isinstance(many.value.__cause__, BrokerError)
    finally:
        await connection.close()
        await delete_namespace(AMQP_URL, namespace)


async def test_connect_failures_raise_the_packages_errors() -> None:
    # Nothing listens on the port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectFailed, match="cannot connect") as raised:
        await Client.connect(f"amqp://guest:guest@127.0.0.1:{port}/%2f", "x", connect_timeout=5)
    assert isinstance(raised.value, BrokerError) and isinstance(raised.value, ConnectionError)
    assert isinstance(raised.value.__cause__, aiormq.exceptions.AMQPConnectionError)
    # A refused login (and the password is not in the message).
    wrong = str(yarl.URL(AMQP_URL).with_password("not-the-password"))
    with pytest.raises(ConnectFailed) as raised:
        await Client.connect(wrong, "x", connect_timeout=5)
    assert isinstance(raised.value.__cause__, aiormq.exceptions.AMQPConnectionError)
    assert "not-the-password" not in str(raised.value)
    # Connected, but the broker refuses the declares ("amq." names are reserved): a BrokerError.
    with pytest.raises(BrokerError, match="ACCESS_REFUSED") as refused:
        await Client.connect(AMQP_URL, "amq", declare=True)
    assert not isinstance(refused.value, ConnectFailed)
    assert isinstance(refused.value.__cause__, aiormq.exceptions.ChannelAccessRefused)
    # Not an AMQP URL: a bad argument (aio-pika would retry it for ever).
    for url in ("localhost:5672", "http://localhost/"):
        with pytest.raises(ValueError, match="AMQP URL"):
            await Client.connect(url, "x")


async def test_a_connection_closed_underneath_fails_fast(consumer: Consumer) -> None:
    """client.connection.close() (not client.close()): the robust connection will not come
    back, so waits, streams and publishes raise BrokerError at once rather than hang until
    their timeouts."""
    async with asyncio.timeout(30):
        client = await Client.connect(consumer.url, consumer.namespace)
        done = await client.submit("text.analyze", {"text": "before"})
        found = await client.result(done, timeout=20)
        waiting = asyncio.ensure_future(client.result(uuid.uuid4(), timeout=20))
        stream = client.results()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await client.connection.close()
        with pytest.raises(BrokerError, match="closed for good"):
            await waiting
        with pytest.raises(BrokerError):
            await stream.__anext__()
        with pytest.raises(BrokerError):
            await client.submit("text.analyze", {"text": "after"})
        with pytest.raises(BrokerError):
            await client.result(uuid.uuid4(), timeout=20)
        assert await client.result(done, timeout=1) is found, "results already here stay readable"
        assert time.monotonic() - started < 5
        await client.close()  # does not raise
        with pytest.raises(QueueWorkerError, match="closed"):
            await client.submit("text.analyze", {"text": "closed"})


async def test_closing_the_client_during_submit_many_fails_the_rest_cleanly() -> None:
    """Publishes in flight when the client closes fail with QueueWorkerError, not with the
    CancelledError of aiormq's cancelled confirms (which looked like a cancellation of the
    caller)."""
    namespace = fresh_namespace("py-closing")
    try:
        async with asyncio.timeout(60):
            client = await Client.connect(AMQP_URL, namespace, declare=True, listen=False)
            publishing = asyncio.ensure_future(client.submit_many([("text.analyze", {"text": "x"})] * 20_000))
            await asyncio.sleep(0.1)
            await client.close()
            try:
                await publishing
                pytest.skip("every job was confirmed before the close")
            except JobRejected as error:
                assert error.failed
                assert len(error.failed) + len(error.confirmed) == 20_000
                assert all(type(e) is QueueWorkerError for e in error.failed.values()), {
                    type(e) for e in error.failed.values()
                }
    finally:
        await delete_namespace(AMQP_URL, namespace)
