"""Exceptions raised by :mod:`queue_worker`."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import JobResult

__all__ = [
    "ConfirmTimeout",
    "ContractError",
    "JobFailed",
    "JobRejected",
    "QueueWorkerError",
    "ResultTimeout",
    "TopologyError",
]


class QueueWorkerError(Exception):
    """Base class of every error this package raises (besides :class:`ValueError` for bad
    arguments)."""


class ContractError(QueueWorkerError, ValueError):
    """A message body (or a JSON document) does not follow the wire contract: not JSON, a
    missing field, a field of the wrong type, a time that is not RFC 3339."""


class JobRejected(QueueWorkerError):
    """The broker did not take the job: it nacked it, or returned it as unroutable (the
    publish is ``mandatory``, and no queue was bound to take it).

    Attributes:
        job_id: The job that was not stored.
        reason: What the broker said.
        confirmed: For :meth:`Client.submit_many`: the ids of the jobs that *were* confirmed.
        failed: For :meth:`Client.submit_many`: every job that was not, with its error.
    """

    def __init__(
        self,
        job_id: uuid.UUID,
        reason: str,
        *,
        confirmed: list[uuid.UUID] | None = None,
        failed: dict[uuid.UUID, BaseException] | None = None,
    ) -> None:
        super().__init__(f"job {job_id} was not accepted by the broker: {reason}")
        self.job_id = job_id
        self.reason = reason
        self.confirmed: list[uuid.UUID] = confirmed or []
        self.failed: dict[uuid.UUID, BaseException] = failed or {}


class ConfirmTimeout(QueueWorkerError):
    """The broker did not confirm a publish in time: the job may or may not be stored.

    Submitting it again with the same ``id`` is safe for the consumer side (jobs are
    at-least-once anyway)."""

    def __init__(self, job_id: uuid.UUID, timeout: float) -> None:
        super().__init__(f"no confirm for job {job_id} within {timeout:g} s; it may or may not be stored")
        self.job_id = job_id
        self.timeout = timeout


class TopologyError(QueueWorkerError):
    """An exchange this client needs does not exist in the namespace: no consumer (or
    producer) has declared the topology yet, and the client was not asked to declare it."""


class ResultTimeout(QueueWorkerError, TimeoutError):
    """No result arrived for the job within the timeout given to :meth:`Client.result`."""

    def __init__(self, job_id: uuid.UUID, timeout: float) -> None:
        super().__init__(f"no result for job {job_id} within {timeout:g} s")
        self.job_id = job_id
        self.timeout = timeout


class JobFailed(QueueWorkerError):
    """Raised by :meth:`JobResult.raise_for_status` for a result whose status is ``failed``.

    Attributes:
        result: The failed result (``result.error`` says why).
    """

    def __init__(self, result: JobResult) -> None:
        super().__init__(f"job {result.job_id} ({result.kind}) failed: {result.error}")
        self.result = result

    @property
    def job_id(self) -> uuid.UUID:
        """The failed job's id."""
        return self.result.job_id

    @property
    def error(self) -> str | None:
        """Why the job failed, as the consumer said."""
        return self.result.error
