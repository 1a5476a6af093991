"""What the client publishes, captured without a broker: exchange, routing key, properties,
delay-ladder headers and body."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from queue_worker import Client, Job, Names


class FakeChannel:
    """Stands for the robust channel and its aiormq channel: records every publish."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    async def get_underlay_channel(self) -> FakeChannel:
        return self

    async def basic_publish(self, body: bytes, **kwargs: Any) -> None:
        self.published.append({"body": body, **kwargs})


@pytest.fixture
def client() -> tuple[Client, FakeChannel]:
    channel = FakeChannel()
    client = Client(
        None,  # type: ignore[arg-type]
        Names("ns"),
        queue_type="quorum",
        declare=False,
        result_buffer=10,
        stream_buffer=10,
        confirm_timeout=5,
        window=4,
    )
    client._channel = channel  # type: ignore[assignment]
    return client, channel


async def test_a_plain_job_goes_to_the_jobs_exchange(client: tuple[Client, FakeChannel]) -> None:
    c, channel = client
    job_id = await c.submit("text.analyze", {"text": "héllo"})
    [sent] = channel.published
    assert sent["exchange"] == "ns.jobs" and sent["routing_key"] == "text.analyze" and sent["mandatory"] is True
    props = sent["properties"]
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.message_id == str(job_id)
    assert not props.headers
    body = json.loads(sent["body"])
    assert body["schema_version"] == 1 and body["id"] == str(job_id) and body["kind"] == "text.analyze"
    assert body["payload"] == {"text": "héllo"} and "not_before" not in body
    assert "héllo".encode() in sent["body"], "non-ASCII text is sent as UTF-8, as serde_json writes it"
    assert b" " not in sent["body"].replace("héllo".encode(), b""), "compact JSON"


@pytest.mark.parametrize(
    ("delay", "exchange", "headers"),
    [
        (2, "ns.jobs.delay.2s", {"delay-3": "1"}),
        (90, "ns.jobs.delay.64s", {"delay-8": "1", "delay-6": "1", "delay-5": "1", "delay-3": "1"}),
        (0.1, "ns.jobs.delay.250ms", {"delay-0": "1"}),
        (timedelta(milliseconds=1_100), "ns.jobs.delay.1s", {"delay-2": "1", "delay-0": "1"}),
    ],
)
async def test_a_delayed_job_enters_the_ladder_at_its_highest_bit(
    client: tuple[Client, FakeChannel], delay: float | timedelta, exchange: str, headers: dict[str, str]
) -> None:
    c, channel = client
    before = datetime.now(UTC)
    job_id = await c.submit("text.analyze", {"text": "later"}, delay=delay)
    [sent] = channel.published
    assert sent["exchange"] == exchange and sent["routing_key"] == "text.analyze"
    assert sent["properties"].headers == headers
    assert all(isinstance(v, str) for v in sent["properties"].headers.values()), 'the string "1"'
    body = json.loads(sent["body"])
    assert body["schema_version"] == 2 and body["id"] == str(job_id)
    job = Job.from_json(sent["body"])
    wait = delay if isinstance(delay, timedelta) else timedelta(seconds=delay)
    assert job.not_before is not None and job.not_before - job.created_at == wait
    assert job.created_at >= before - timedelta(seconds=1)


async def test_zero_delay_and_a_past_not_before_are_version_1(client: tuple[Client, FakeChannel]) -> None:
    c, channel = client
    await c.submit("k", 1, delay=0)
    await c.submit("k", 1, not_before=datetime.now(UTC) - timedelta(minutes=1))
    for sent in channel.published:
        assert sent["exchange"] == "ns.jobs" and json.loads(sent["body"])["schema_version"] == 1


async def test_a_not_before_is_kept_as_given(client: tuple[Client, FakeChannel]) -> None:
    c, channel = client
    at = datetime.now(UTC) + timedelta(hours=3)
    await c.submit("k", None, not_before=at, id="6f1c2a4e-8d2b-4b7e-9a53-0c9f4b1d2e3f")
    [sent] = channel.published
    job = Job.from_json(sent["body"])
    assert job.not_before == at and job.id == uuid.UUID("6f1c2a4e-8d2b-4b7e-9a53-0c9f4b1d2e3f")
    assert sent["exchange"].startswith("ns.jobs.delay.") and job.payload is None
    with pytest.raises(ValueError, match="timezone"):
        await c.submit("k", None, not_before=datetime.now() + timedelta(hours=1))
    with pytest.raises(ValueError, match="longest"):
        await c.submit("k", None, not_before=datetime.now(UTC) + timedelta(days=367))
    with pytest.raises(ValueError, match="not both"):
        await c.submit("k", None, not_before=at, delay=1)


async def test_submit_many_checks_everything_before_sending(client: tuple[Client, FakeChannel]) -> None:
    c, channel = client
    with pytest.raises(ValueError, match="job 2"):
        await c.submit_many([("k", 1), ("k", 2), ("", 3)])
    assert channel.published == []
    ids = await c.submit_many([("k", i) for i in range(10)])
    assert [json.loads(s["body"])["id"] for s in channel.published] == [str(i) for i in ids]
    stale = Job("k", 1, not_before=datetime.now(UTC), schema_version=1)
    with pytest.raises(ValueError, match="schema_version 2"):
        await c.submit_many([stale])


async def test_a_dropped_stream_is_forgotten(client: tuple[Client, FakeChannel]) -> None:
    import gc

    from queue_worker import JobResult, Status

    c, _ = client
    c._listening = True
    kept = c.results()
    c.results()  # dropped at once
    gc.collect()
    assert list(c._streams) == [kept]
    result = JobResult(uuid.uuid4(), "k", Status.OK, 1, None, 1, datetime.now(UTC))
    await c._deliver(result)
    assert await kept.__anext__() is result
    assert c.try_result(result.job_id) is result
    await kept.aclose()
    assert not c._streams
