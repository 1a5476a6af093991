"""A small HTTP front for the job queue, built on :class:`queue_worker.Client`.

Run it (with a consumer running on the same broker and namespace)::

    pip install 'queue-worker-client[fastapi]'
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f JOBS_NAMESPACE= \\
        uvicorn fastapi_app:app --app-dir clients/python/examples

Endpoints:

* ``POST /jobs`` ``{"kind", "payload", "id"?, "delay"?}`` → 202 ``{"id"}`` once the broker
  confirmed the job; 422 for a bad kind, id or delay; 503 when the broker did not take it.
* ``GET /jobs/{id}`` → 200 with the result once it arrived, 202 ``{"id", "status":
  "pending"}`` before, 404 for an id this app neither sent nor saw a result of.
* ``POST /jobs/wait`` ``{"kind", "payload", ..., "timeout"?}`` → enqueues, then 200 with the
  result, or 202 ``{"id", "status": "pending"}`` if it did not come within ``timeout`` seconds
  (poll ``GET /jobs/{id}`` then).

One :class:`Client` is connected at startup (FastAPI lifespan) and shared by every request.
Results are kept in the client's buffer (the last 10,000, within 64 MiB), so ``GET`` finds a
result that arrived before it was asked for; results of jobs sent before this app started
are not known to it.
"""

import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from queue_worker import DEFAULT_URL, Client, QueueWorkerError, ResultTimeout

#: Ids of jobs sent through this app that GET still calls pending (the most recent).
MAX_TRACKED = 100_000


class NewJob(BaseModel):
    """The body of ``POST /jobs``."""

    kind: str
    payload: Any
    id: uuid.UUID | None = None
    delay: float | None = Field(default=None, description="seconds to wait before the job may run")


class WaitJob(NewJob):
    """The body of ``POST /jobs/wait``."""

    timeout: float = Field(default=30.0, gt=0, le=300, description="seconds to wait for the result")


def create_app(
    url: str | None = None, namespace: str | None = None, *, declare: bool = False
) -> FastAPI:
    """The app; ``url`` and ``namespace`` default to ``AMQP_URL`` and ``JOBS_NAMESPACE``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = await Client.connect(
            url or os.environ.get("AMQP_URL", DEFAULT_URL),
            namespace if namespace is not None else os.environ.get("JOBS_NAMESPACE", ""),
            declare=declare,
        )
        app.state.client = client
        app.state.sent = OrderedDict()
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(title="queue-worker jobs", lifespan=lifespan)

    def client_of(request: Request) -> Client:
        return request.app.state.client  # type: ignore[no-any-return]

    async def enqueue(request: Request, job: NewJob) -> uuid.UUID:
        try:
            job_id = await client_of(request).submit(job.kind, job.payload, id=job.id, delay=job.delay)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        except QueueWorkerError as error:  # JobRejected, ConfirmTimeout, ...
            raise HTTPException(status_code=503, detail=str(error)) from None
        sent: OrderedDict[uuid.UUID, None] = request.app.state.sent
        sent[job_id] = None
        while len(sent) > MAX_TRACKED:
            sent.popitem(last=False)
        return job_id

    @app.post("/jobs", status_code=202)
    async def post_job(job: NewJob, request: Request) -> dict[str, str]:
        """Enqueues a job; answers once the broker confirmed it."""
        return {"id": str(await enqueue(request, job))}

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: uuid.UUID, request: Request) -> JSONResponse:
        """The job's result (200), or that it is pending (202)."""
        result = client_of(request).try_result(job_id)
        if result is not None:
            return JSONResponse(result.to_dict())
        if job_id in request.app.state.sent:
            return JSONResponse({"id": str(job_id), "status": "pending"}, status_code=202)
        return JSONResponse({"error": f"job {job_id} is not known here"}, status_code=404)

    @app.post("/jobs/wait")
    async def post_and_wait(job: WaitJob, request: Request) -> JSONResponse:
        """Enqueues a job and waits up to ``timeout`` seconds for its result."""
        job_id = await enqueue(request, job)
        try:
            result = await client_of(request).result(job_id, timeout=job.timeout)
        except ResultTimeout:
            return JSONResponse({"id": str(job_id), "status": "pending"}, status_code=202)
        return JSONResponse(result.to_dict())

    return app


app = create_app()
