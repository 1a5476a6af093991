"""The contract examples shared with the Rust side (``shared/tests/contract/*.json``): each
parses into its dataclass and serializes back to the same JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from queue_worker import Job, JobResult, Status

CONTRACT = Path(os.environ.get("CONTRACT_DIR", Path(__file__).resolve().parents[3] / "shared" / "tests" / "contract"))

CASES = {
    "job_v1.json": Job,
    "job_v2_delayed.json": Job,
    "result_ok.json": JobResult,
    "result_failed.json": JobResult,
    "result_hops.json": JobResult,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_example_round_trips(name: str) -> None:
    text = (CONTRACT / name).read_text(encoding="utf-8")
    parsed = CASES[name].from_json(text)
    assert json.loads(parsed.to_json()) == json.loads(text)
    # From bytes, and from an already parsed object, too.
    assert CASES[name].from_json(text.encode()) == parsed
    assert CASES[name].from_json(json.loads(text)) == parsed


def test_every_example_file_is_covered() -> None:
    assert sorted(p.name for p in CONTRACT.glob("*.json")) == sorted(CASES)


def test_what_the_examples_say() -> None:
    v1 = Job.from_json((CONTRACT / "job_v1.json").read_text())
    assert v1.schema_version == 1 and v1.not_before is None and "not_before" not in v1.to_dict()
    v2 = Job.from_json((CONTRACT / "job_v2_delayed.json").read_text())
    assert v2.schema_version == 2 and v2.not_before is not None and v2.not_before > v2.created_at
    ok = JobResult.from_json((CONTRACT / "result_ok.json").read_text())
    assert ok.status is Status.OK and ok.hops == 0 and "hops" not in ok.to_dict()
    failed = JobResult.from_json((CONTRACT / "result_failed.json").read_text())
    assert failed.status is Status.FAILED and failed.output is None and failed.error
    assert failed.to_dict()["job_created_at"] is None  # null, not left out
    hops = JobResult.from_json((CONTRACT / "result_hops.json").read_text())
    assert hops.hops == 1 and hops.to_dict()["hops"] == 1
