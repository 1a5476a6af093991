"""Exceptions raised by :mod:`queue_worker`."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import JobResult

__all__ = [
    "BrokerError",
    "ConfirmTimeout",
    "ConnectFailed",
    "ContractError",
    "JobFailed",
    "JobRejected",
    "QueueWorkerError",
    "ResultTimeout",
    "StreamOverflow",
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


class BrokerError(QueueWorkerError):
    """The broker, or the connection to it, failed an operation in a way the client does not
    recover from by itself: it refused it (``ACCESS_REFUSED``, ...) and closed the channel, a
    declare failed, or the connection was closed for good (``client.connection.close()``).
    ``__cause__`` is the underlying aio-pika / aiormq / OS error.

    A lost connection is not one: the robust connection comes back, and a publish cut off by
    it is sent again (within ``confirm_timeout``). For a publish, unless the message says
    otherwise, the job may or may not be stored: submitting it again with the same ``id`` is
    safe for the consumer side (jobs are at-least-once anyway)."""


class ConnectFailed(BrokerError, ConnectionError):
    """:meth:`Client.connect` could not open the connection: the broker cannot be reached
    (refused, unknown host, TLS, no answer within ``connect_timeout``), or refused the login
    or the virtual host. Also a :class:`ConnectionError`. Worth retrying while a broker
    starts; a refused login will not fix itself."""


class StreamOverflow(QueueWorkerError):
    """A :meth:`Client.results` stream fell behind: it already held its bound of results
    (``stream_buffer``) or of bytes (``max_stream_bytes``) when another result came, so it
    was detached from the client rather than hold up every other reader. Raised by the
    stream once the results it already held have been read; iteration ends after it.

    The results it missed were handed to :meth:`Client.result` waiters, the other streams
    and the client's buffer as usual (:meth:`Client.try_result` finds them while they are
    buffered).

    Attributes:
        job_id: The first result the stream missed (it missed every later one too).
        waiting: Results that were waiting in the stream then (its reader got them all).
        waiting_bytes: Their size (JSON bodies).
        maxsize: The stream's bound of results.
        max_bytes: The stream's bound of bytes.
    """

    def __init__(self, job_id: uuid.UUID, *, waiting: int, waiting_bytes: int, maxsize: int, max_bytes: int) -> None:
        super().__init__(
            f"the results stream fell behind and was detached: {waiting} results ({waiting_bytes} bytes) were "
            f"waiting in it (bounds: {maxsize} results, {max_bytes} bytes) when the result of job {job_id} came; "
            f"it missed that result and every later one. Read streams promptly, or connect with a larger "
            f"stream_buffer / max_stream_bytes"
        )
        self.job_id = job_id
        self.waiting = waiting
        self.waiting_bytes = waiting_bytes
        self.maxsize = maxsize
        self.max_bytes = max_bytes


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
