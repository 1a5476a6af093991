"""The wire types, names and the delay ladder, without a broker."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from queue_worker import (
    ContractError,
    DeadLetter,
    DelayPlan,
    Job,
    JobFailed,
    JobResult,
    Names,
    Status,
    check_kind,
)
from queue_worker._time import format_rfc3339, parse_rfc3339
from queue_worker.topology import LEVELS, MAX_DELAY, level_label, level_ttl

ID = "6f1c2a4e-8d2b-4b7e-9a53-0c9f4b1d2e3f"


def test_names_follow_topology_rs() -> None:
    n = Names()
    assert (n.jobs_exchange, n.work_queue, n.unrouted_exchange) == ("jobs", "jobs.work", "jobs.unrouted")
    assert (n.results_exchange, n.results_queue, n.dead_exchange, n.dead_queue) == (
        "jobs.results",
        "jobs.results",
        "jobs.dlx",
        "jobs.dead",
    )
    assert n.progress_exchange == "jobs.progress"
    t = Names("t1")
    assert t.jobs_exchange == "t1.jobs" and t.work_queue == "t1.jobs.work"
    assert t.kind_queue("a.b") == "t1.jobs.kind.a.b"
    assert t.delay_level(0) == "t1.jobs.delay.250ms"
    assert t.delay_level(2) == "t1.jobs.delay.1s"
    assert t.delay_level(LEVELS - 1) == "t1.jobs.delay.4194304s"
    assert t.below(0) == "t1.jobs" and t.below(3) == "t1.jobs.delay.1s"
    assert len(t.exchanges()) == 5 + LEVELS and len(t.queues(["k"])) == 3 + LEVELS + 1
    for bad in ["a b", "x" * 201, "é"]:
        with pytest.raises(ValueError, match="namespace"):
            Names(bad)


def test_the_delay_ladder_follows_delay_rs() -> None:
    assert DelayPlan.for_delay(timedelta(0)) is None
    assert DelayPlan.for_delay(timedelta(seconds=-1)) is None
    p = DelayPlan.for_delay(timedelta(milliseconds=1))
    assert p is not None and (p.units, p.entry, p.levels) == (1, 0, (0,))
    p = DelayPlan.for_delay(timedelta(seconds=90))
    assert p is not None and p.units == 360 and p.levels == (8, 6, 5, 3) and p.total == timedelta(seconds=90)
    assert p.headers() == {"delay-8": "1", "delay-6": "1", "delay-5": "1", "delay-3": "1"}
    p = DelayPlan.for_delay(timedelta(milliseconds=1_100))
    assert p is not None and p.total == timedelta(milliseconds=1_250)
    huge = DelayPlan.for_delay(timedelta(days=366))
    assert huge is not None and huge.total == MAX_DELAY and len(huge.levels) == LEVELS
    assert level_label(0) == "250ms" and level_label(1) == "500ms" and level_label(2) == "1s"
    assert level_ttl(LEVELS - 1) / timedelta(milliseconds=1) <= 2**32 - 1
    exchange, headers = Names("n").route(timedelta(seconds=2))
    assert exchange == "n.jobs.delay.2s" and headers == {"delay-3": "1"}
    assert Names("n").route(timedelta(0)) == ("n.jobs", None)


def test_kinds_are_checked_like_check_kind() -> None:
    assert check_kind("text.analyze") == "text.analyze"
    assert check_kind("é" * 127) and check_kind("k" * 255)
    for bad in ["", "k" * 256, "a\x7fb", "a\u0085b", "\x00"]:
        with pytest.raises(ValueError):
            check_kind(bad)


@pytest.mark.parametrize(
    ("text", "again"),
    [
        ("2026-11-25T10:00:00Z", None),
        ("2026-11-25T10:00:00.012Z", None),
        ("2026-11-25T10:00:00.123456Z", None),
        ("2026-11-25T10:00:00.500000Z", "2026-11-25T10:00:00.5Z"),
        ("2026-11-25T10:00:00.123456789Z", "2026-11-25T10:00:00.123456Z"),
        ("2026-11-25t10:00:00z", "2026-11-25T10:00:00Z"),
        ("2026-11-25T10:00:00+00:00", "2026-11-25T10:00:00Z"),
        ("2026-11-25T10:00:00+02:30", None),
        ("2026-11-25T10:00:00.1-05:00", None),
    ],
)
def test_times_are_written_as_the_time_crate_writes_them(text: str, again: str | None) -> None:
    assert format_rfc3339(parse_rfc3339(text)) == (again or text)


@pytest.mark.parametrize("bad", ["2026-11-25 10:00:00Z", "2026-11-25T10:00:00", "2026-13-01T00:00:00Z", 5, None])
def test_bad_times_are_contract_errors(bad: object) -> None:
    with pytest.raises(ContractError):
        parse_rfc3339(bad)


def test_naive_times_cannot_be_written() -> None:
    with pytest.raises(ValueError, match="timezone"):
        format_rfc3339(datetime(2026, 1, 1))


def test_a_job_picks_the_lowest_version_that_carries_its_fields() -> None:
    plain = Job("k", {"a": 1})
    assert plain.schema_version == 1 and set(plain.to_dict()) == {"schema_version", "id", "kind", "created_at", "payload"}
    later = Job("k", 1, not_before=datetime.now(timezone.utc))
    assert later.schema_version == 2 and "not_before" in later.to_dict()
    body = json.loads(plain.to_bytes())
    assert body["id"] == str(plain.id) and body["created_at"].endswith("Z")


def test_unknown_fields_are_ignored_and_missing_ones_refused() -> None:
    body = f'{{"schema_version":1,"id":"{ID}","kind":"k","created_at":"2026-01-02T03:04:05Z","payload":{{"b":1}},"extra":"x"}}'
    job = Job.from_json(body)
    assert job.payload == {"b": 1} and "extra" not in job.to_dict()
    for field in ["schema_version", "id", "kind", "created_at", "payload"]:
        obj = json.loads(body)
        del obj[field]
        with pytest.raises(ContractError, match=field):
            Job.from_json(json.dumps(obj))
    with pytest.raises(ContractError):
        Job.from_json(body.replace('"schema_version":1', '"schema_version":"1"'))
    with pytest.raises(ContractError):
        Job.from_json(body.replace('"schema_version":1', '"schema_version":true'))
    with pytest.raises(ContractError, match="JSON"):
        Job.from_json(b"\xff")
    with pytest.raises(ContractError, match="object"):
        Job.from_json("[]")


def test_a_result_without_job_created_at_still_parses() -> None:
    body = f'{{"schema_version":1,"job_id":"{ID}","kind":"k","status":"ok","output":1,"error":null,"attempts":1,"finished_at":"2026-01-02T03:04:05Z","stages":[]}}'
    result = JobResult.from_json(body)
    assert result.job_created_at is None and result.latency is None and result.output == 1
    assert result.to_dict()["job_created_at"] is None
    with pytest.raises(ContractError, match="status"):
        JobResult.from_json(body.replace('"ok"', '"done"'))


def test_raise_for_status() -> None:
    failed = JobResult(
        job_id=uuid.UUID(ID),
        kind="k",
        status=Status.FAILED,
        output=None,
        error="boom",
        attempts=3,
        finished_at=datetime.now(timezone.utc),
    )
    with pytest.raises(JobFailed, match="boom") as raised:
        failed.raise_for_status()
    assert raised.value.error == "boom"


def test_a_dead_letter_from_its_message_and_as_json() -> None:
    body = f'{{"schema_version":1,"id":"{ID}","kind":"text.analyze","created_at":"2026-01-02T03:04:05Z","payload":{{}}}}'.encode()
    letter = DeadLetter.from_message(
        body=body,
        headers={
            "x-error": b"invalid payload: missing field `text`",
            "x-failed-stage": "decode",
            "x-attempts": 1,
            "x-dead-at": 1_767_323_045,
        },
        message_id=ID,
        routing_key="text.analyze",
    )
    assert letter.job_id == uuid.UUID(ID) and letter.kind == "text.analyze"
    assert letter.failed_stage == "decode" and letter.error.startswith("invalid payload")
    assert letter.attempts == 1
    assert letter.dead_at == datetime.fromtimestamp(1_767_323_045, timezone.utc)
    assert letter.is_job and letter.job is not None and letter.job.kind == "text.analyze"
    out = letter.to_dict()
    assert out["stage"] == "decode" and out["bytes"] == len(body) and out["dead_at"].endswith("Z")
    assert DeadLetter.from_json(letter.to_json()) == letter
    junk = DeadLetter.from_message(body=b"\xff\x00", headers={}, message_id="not a uuid")
    assert junk.job_id is None and not junk.is_job and junk.job is None
    assert DeadLetter.from_json(junk.to_json()) == junk
    assert out["fanin_check"] is False and not letter.fanin_check


def test_a_dead_fan_in_check_is_told_apart_as_producer_dead_list_does() -> None:
    check = (
        f'{{"schema_version":1,"id":"{ID}","kind":"text.analyze","created_at":"2026-01-02T03:04:05Z",'
        '"payload":null,"fanin":{"parent":"x"}}'
    ).encode()
    died_in_join = DeadLetter.from_message(body=check, headers={"x-failed-stage": "join"})
    assert died_in_join.fanin_check and died_in_join.to_dict()["fanin_check"] is True
    # One that died before any join (its mailbox whole) can be replayed: not one of these.
    died_early = DeadLetter.from_message(body=check, headers={"x-failed-stage": "envelope"})
    assert not died_early.fanin_check
