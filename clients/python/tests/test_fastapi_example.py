"""The FastAPI example (``examples/fastapi_app.py``) through httpx's ASGI transport, against
the real consumer."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from helpers import Consumer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"


def load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def http(consumer: Consumer) -> AsyncIterator[httpx.AsyncClient]:
    app = load_example().create_app(consumer.url, consumer.namespace)
    # httpx's ASGI transport does not run the lifespan: run it around the requests.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            yield client


async def test_post_then_poll(http: httpx.AsyncClient) -> None:
    async with asyncio.timeout(30):
        posted = await http.post("/jobs", json={"kind": "text.analyze", "payload": {"text": "hello world"}})
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        uuid.UUID(job_id)
        while True:
            got = await http.get(f"/jobs/{job_id}")
            if got.status_code == 200:
                break
            assert got.status_code == 202 and got.json() == {"id": job_id, "status": "pending"}
            await asyncio.sleep(0.05)
    body = got.json()
    assert body["job_id"] == job_id and body["status"] == "ok" and body["output"]["words"] == 2


async def test_post_and_wait(http: httpx.AsyncClient) -> None:
    async with asyncio.timeout(30):
        answer = await http.post(
            "/jobs/wait", json={"kind": "text.analyze", "payload": {"text": "a b c"}, "timeout": 20}
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["output"]["words"] == 3


async def test_wait_times_out_into_pending(http: httpx.AsyncClient) -> None:
    async with asyncio.timeout(30):
        answer = await http.post(
            "/jobs/wait",
            json={"kind": "text.analyze", "payload": {"text": "later"}, "delay": 2, "timeout": 0.2},
        )
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        assert (await http.get(f"/jobs/{job_id}")).status_code == 202


async def test_bad_requests(http: httpx.AsyncClient) -> None:
    bad_kind = await http.post("/jobs", json={"kind": "", "payload": {}})
    assert bad_kind.status_code == 422 and "kind" in bad_kind.text
    too_late = await http.post("/jobs", json={"kind": "k", "payload": {}, "delay": 400 * 86_400})
    assert too_late.status_code == 422
    unknown = await http.get(f"/jobs/{uuid.uuid4()}")
    assert unknown.status_code == 404
    assert (await http.get("/jobs/not-a-uuid")).status_code == 422
