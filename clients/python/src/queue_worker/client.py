"""The asyncio client: submit jobs, await their results."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ._time import utc_now
from .errors import (
    ConfirmTimeout,
    ContractError,
    JobRejected,
    QueueWorkerError,
    ResultTimeout,
    TopologyError,
)
from .models import FANOUT_SCHEMA_VERSION, WORKFLOW_SCHEMA_VERSION, Job, JobResult, as_uuid
from .topology import LEVELS, MATCH_ALL, MAX_AHEAD, Names, check_kind, level_header, level_ttl

__all__ = ["DEFAULT_URL", "Client", "ResultStream"]

log = logging.getLogger("queue_worker")

#: Broker URL used when none is given (the same default as the Rust binaries).
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"

_CONTENT_TYPE = "application/json"
_ACK_BATCH = 64
_CLOSED: Any = object()

QueueType = Literal["quorum", "classic"]


@dataclass(frozen=True)
class _Outgoing:
    """A job ready to publish: validated and encoded."""

    id: uuid.UUID
    kind: str
    body: bytes
    not_before: datetime | None


class ResultStream:
    """Every result of the namespace that arrives after the stream was created, in arrival
    order: ``async for result in client.results(): ...``.

    It is registered when :meth:`Client.results` returns, so results of jobs submitted after
    that call are never missed, even before iteration starts. At most ``maxsize`` results wait
    in it; beyond that the client stops acknowledging results, so the broker stops sending
    them (for every reader of this client) until the stream is read again: read it, or close
    it (``aclose()``, ``async with``), or drop every reference to it (the client holds it
    weakly, so ``async for r in client.results(): ... break`` leaves nothing behind).
    Results are at-least-once: after a reconnection one may come twice.
    """

    def __init__(self, client: Client, maxsize: int) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self._client = weakref.ref(client)
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> JobResult:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CLOSED:
            self._closed = True
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Stops the stream: no more results are put in it."""
        self._closed = True
        client = self._client()
        if client is not None:
            client._streams.discard(self)
        while not self._queue.empty():
            self._queue.get_nowait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _put(self, result: JobResult) -> None:
        if not self._closed:
            await self._queue.put(result)

    def _end(self) -> None:
        self._closed = True
        try:
            self._queue.put_nowait(_CLOSED)
        except asyncio.QueueFull:
            pass


class Client:
    """A connection to the job queue of one namespace: publishes jobs, and listens to the
    results.

    Create one with :meth:`connect` (it is an async context manager too)::

        async with await Client.connect("amqp://guest:guest@localhost/%2f") as client:
            job_id = await client.submit("text.analyze", {"text": "hello world"})
            result = await client.result(job_id, timeout=30)
            print(result.raise_for_status().output)

    One client serves any number of concurrent tasks: publishes share one confirm channel,
    and every result arrives once through one private queue (``jobs.results.wait.<id>``,
    declared as ``producer --wait`` declares its own: durable, classic, ``x-expires``) and
    is handed to whoever waits for it.
    """

    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        names: Names,
        *,
        queue_type: QueueType,
        declare: bool,
        result_buffer: int,
        stream_buffer: int,
        confirm_timeout: float,
        window: int,
    ) -> None:
        """Use :meth:`connect`."""
        self._connection = connection
        self._names = names
        self._queue_type = queue_type
        self._declare = declare
        self._confirm_timeout = confirm_timeout
        self._window = window
        self._channel: AbstractChannel | None = None
        self._ladder_ready = False
        self._ladder_lock = asyncio.Lock()
        # Results listener.
        self._listening = False
        self._listener_channel: AbstractChannel | None = None
        self._listener_queue: AbstractQueue | None = None
        self._listener_tag: str | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None
        self._buffer: OrderedDict[uuid.UUID, JobResult] = OrderedDict()
        self._buffer_size = result_buffer
        self._stream_buffer = stream_buffer
        self._waiters: dict[uuid.UUID, list[asyncio.Future[JobResult]]] = {}
        self._streams: weakref.WeakSet[ResultStream] = weakref.WeakSet()
        self._closed = False

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect(
        cls,
        url: str = DEFAULT_URL,
        namespace: str = "",
        *,
        reconnect_interval: float = 1.0,
        declare: bool = False,
        queue_type: QueueType = "quorum",
        listen: bool = True,
        result_buffer: int = 10_000,
        stream_buffer: int = 10_000,
        listener_expires: float = 300.0,
        confirm_timeout: float = 30.0,
        window: int = 256,
        connect_timeout: float = 10.0,
        connection_name: str = "queue-worker-python",
    ) -> Client:
        """Connects to the broker and, unless ``listen`` is false, starts listening to
        results.

        Args:
            url: AMQP URL (``amqp://`` or ``amqps://``), as ``AMQP_URL`` of the binaries.
            namespace: Prefix of every name, like the binaries' ``--namespace``
                (``JOBS_NAMESPACE``): ``t1`` gives ``t1.jobs``, ``t1.jobs.work``, ...
            declare: Declare the topology a publisher needs if it is missing, as
                ``producer`` does: the exchanges, ``jobs.work``, ``jobs.results`` and
                ``jobs.dead`` at connect, the delay ladder before the first delayed job. With
                the default ``False`` the client declares nothing but its private results queue
                (like ``producer --no-declare``): a consumer of the namespace must have
                started once (it declares everything), or connecting raises
                :class:`TopologyError`.
            queue_type: With ``declare``: the type of the durable queues, as the binaries'
                ``--queue-type``; it must match what the consumers use.
            listen: Listen to results (needed by :meth:`result` and :meth:`results`); a
                client that only submits can leave it off.
            result_buffer: Results kept for later :meth:`result` calls (the most recent).
            stream_buffer: Results that may wait in each :meth:`results` stream.
            listener_expires: Seconds the private results queue outlives the connection
                (``x-expires``), so that results published during a reconnection wait in it.
            reconnect_interval: Seconds between attempts to reconnect a lost connection (the
                connection is robust: channels, the results queue and its consumer come back,
                and a publish cut off is sent again).
            confirm_timeout: Seconds to wait for the broker's confirm of a publish (across
                reconnections).
            window: Publishes awaiting their confirm at once in :meth:`submit_many`.
            connect_timeout: Seconds to wait for the connection.
            connection_name: Shown in the broker's management UI.

        Raises:
            ValueError: A bad namespace or option.
            TopologyError: The namespace's exchanges do not exist (see ``declare``).
            aio_pika.exceptions.AMQPConnectionError: The broker cannot be reached or refused
                the login.
        """
        names = Names(namespace)
        if queue_type not in ("quorum", "classic"):
            raise ValueError(f"queue_type must be 'quorum' or 'classic', not {queue_type!r}")
        if window < 1 or result_buffer < 0 or stream_buffer < 1:
            raise ValueError("window and stream_buffer must be at least 1, result_buffer at least 0")
        if not 0 < listener_expires * 1000 < 2**32:
            raise ValueError("listener_expires must be above 0 and below 2^32 ms")
        connection = await aio_pika.connect_robust(
            url,
            timeout=connect_timeout,
            client_properties={"connection_name": connection_name},
            reconnect_interval=reconnect_interval,
        )
        client = cls(
            connection,
            names,
            queue_type=queue_type,
            declare=declare,
            result_buffer=result_buffer,
            stream_buffer=stream_buffer,
            confirm_timeout=confirm_timeout,
            window=window,
        )
        try:
            if declare:
                await client._declare_topology()
            else:
                needed = [names.jobs_exchange] + ([names.results_exchange] if listen else [])
                await client._check_exchanges(needed)
            client._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            if listen:
                await client._start_listener(listener_expires)
        except BaseException:
            await connection.close()
            raise
        return client

    @property
    def names(self) -> Names:
        """The namespace's exchange and queue names."""
        return self._names

    @property
    def namespace(self) -> str:
        """The namespace this client works in."""
        return self._names.namespace

    @property
    def connection(self) -> aio_pika.abc.AbstractRobustConnection:
        """The underlying ``aio_pika`` robust connection."""
        return self._connection

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops listening, deletes the private results queue, and closes the connection.
        Pending :meth:`result` calls raise :class:`QueueWorkerError`; result streams end.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(QueueWorkerError("the client was closed"))
        self._waiters.clear()
        for stream in list(self._streams):
            stream._end()
        self._streams.clear()
        queue = self._listener_queue
        live = not self._connection.is_closed
        if queue is not None and self._listener_tag is not None and live:
            try:
                await asyncio.wait_for(queue.cancel(self._listener_tag), 5)
            except Exception as error:  # best effort
                log.debug("could not cancel the results consumer: %s", error)
        if self._dispatcher is not None:
            self._inbox.put_nowait(_CLOSED)
            try:
                await asyncio.wait_for(self._dispatcher, 5)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._dispatcher.cancel()
        if queue is not None and live:
            try:
                await asyncio.wait_for(queue.delete(if_unused=False, if_empty=False), 5)
            except Exception as error:  # best effort: it expires by itself
                log.debug("could not delete the results queue: %s", error)
        await self._connection.close()

    # ------------------------------------------------------------------ topology

    async def _check_exchanges(self, exchanges: Iterable[str]) -> None:
        """Raises :class:`TopologyError` unless every exchange exists (passive declares)."""
        for name in exchanges:
            channel = await self._connection.channel()
            try:
                await channel.get_exchange(name, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TopologyError(
                    f"exchange {name!r} does not exist: no consumer of namespace "
                    f"{self.namespace!r} has started yet. Start one (it declares the topology), or "
                    f"connect with declare=True"
                ) from None
            finally:
                await channel.close()

    async def _declare_topology(self) -> None:
        """Declares what a publisher needs, exactly as ``Topology::declare`` does
        (``shared/src/declare.rs``), wherever it is missing. An exchange or queue that exists
        with other arguments (an earlier build's) is kept as it is, as the Rust side does."""
        n = self._names
        exchanges: list[tuple[str, dict[str, Any]]] = [
            (n.unrouted_exchange, {}),
            (n.jobs_exchange, {"alternate-exchange": n.unrouted_exchange}),
            (n.results_exchange, {}),
            (n.progress_exchange, {}),
            (n.dead_exchange, {}),
        ]
        queues = [
            (n.work_queue, self._work_queue_arguments()),
            (n.results_queue, self._queue_arguments()),
            (n.dead_queue, self._queue_arguments()),
        ]
        bindings = [
            (n.work_queue, n.unrouted_exchange, MATCH_ALL, None),
            (n.results_queue, n.results_exchange, MATCH_ALL, None),
            (n.dead_queue, n.dead_exchange, MATCH_ALL, None),
        ]
        await self._declare_all(
            [(name, aio_pika.ExchangeType.TOPIC, args) for name, args in exchanges], queues, bindings
        )

    async def _ensure_ladder(self) -> None:
        """With ``declare``: declares the delay ladder (``Topology::declare_delays``) once."""
        if self._ladder_ready or not self._declare:
            return
        async with self._ladder_lock:
            if self._ladder_ready:
                return
            n = self._names
            exchanges = [
                (n.delay_level(k), aio_pika.ExchangeType.HEADERS, {"alternate-exchange": n.below(k)})
                for k in range(LEVELS)
            ]
            queues = [(n.delay_level(k), self._delay_queue_arguments(k)) for k in range(LEVELS)]
            bindings = [
                (n.delay_level(k), n.delay_level(k), "", {"x-match": "all", level_header(k): "1"})
                for k in range(LEVELS)
            ]
            await self._declare_all(exchanges, queues, bindings)
            self._ladder_ready = True

    async def _declare_all(
        self,
        exchanges: Sequence[tuple[str, aio_pika.ExchangeType, dict[str, Any]]],
        queues: Sequence[tuple[str, dict[str, Any]]],
        bindings: Sequence[tuple[str, str, str, Mapping[str, str] | None]],
    ) -> None:
        channel = await self._connection.channel()
        try:
            for name, type_, args in exchanges:
                try:
                    await channel.declare_exchange(name, type_, durable=True, arguments=args)
                except aiormq.exceptions.ChannelPreconditionFailed as error:
                    log.warning("exchange %s exists with other arguments; keeping it (%s)", name, error)
                    await channel.close()
                    channel = await self._connection.channel()
            for name, args in queues:
                try:
                    await channel.declare_queue(name, durable=True, arguments=args)
                except aiormq.exceptions.ChannelPreconditionFailed as error:
                    log.warning("queue %s exists with other arguments; keeping it (%s)", name, error)
                    await channel.close()
                    channel = await self._connection.channel()
            for queue, exchange, key, binding_args in bindings:
                underlay = await channel.get_underlay_channel()
                arguments: dict[str, Any] | None = dict(binding_args) if binding_args else None
                await underlay.queue_bind(queue, exchange, routing_key=key, arguments=arguments)
        finally:
            await channel.close()

    def _queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": self._queue_type}

    def _work_queue_arguments(self) -> dict[str, Any]:
        args = self._queue_arguments()
        args["x-dead-letter-exchange"] = self._names.dead_exchange
        if self._queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    def _delay_queue_arguments(self, level: int) -> dict[str, Any]:
        args = self._queue_arguments()
        args["x-message-ttl"] = int(level_ttl(level) / timedelta(milliseconds=1))
        args["x-dead-letter-exchange"] = self._names.below(level)
        if self._queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    # ------------------------------------------------------------------ submitting

    def new_job(
        self,
        kind: str,
        payload: Any,
        *,
        id: uuid.UUID | str | None = None,
        delay: float | timedelta | None = None,
        not_before: datetime | None = None,
    ) -> Job:
        """Builds (and checks) the job :meth:`submit` would publish, without publishing it.

        A job due later than now carries ``not_before`` and is schema version 2; a job due now
        (no delay, a zero delay, or a ``not_before`` in the past) is version 1 without it.

        Raises:
            ValueError: A bad kind (1 to 255 bytes, no control characters), a bad id, a
                negative delay or one longer than 366 days, a naive ``not_before``, both
                ``delay`` and ``not_before``.
        """
        check_kind(kind)
        job_id = uuid.uuid4() if id is None else as_uuid(id)
        created_at = utc_now()
        if delay is not None and not_before is not None:
            raise ValueError("give delay or not_before, not both")
        due: datetime | None = None
        if delay is not None:
            if isinstance(delay, timedelta):
                wait = delay
            elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
                if not math.isfinite(delay):
                    raise ValueError(f"delay must be a finite number of seconds, got {delay!r}")
                if delay > MAX_AHEAD.total_seconds():
                    raise ValueError(f"a delay of {delay} s is longer than the longest there is, {MAX_AHEAD.days} days")
                wait = timedelta(seconds=delay)
            else:
                raise ValueError(f"delay must be seconds or a timedelta, not {type(delay).__name__}")
            if wait < timedelta(0):
                raise ValueError(f"delay must not be negative, got {wait}")
            if wait > MAX_AHEAD:
                raise ValueError(f"a delay of {wait} is longer than the longest there is, {MAX_AHEAD.days} days")
            due = created_at + wait
        elif not_before is not None:
            if not isinstance(not_before, datetime):
                raise ValueError(f"not_before must be a datetime, not {type(not_before).__name__}")
            if not_before.utcoffset() is None:
                raise ValueError("not_before must be timezone-aware (e.g. datetime.now(timezone.utc))")
            if not_before - created_at > MAX_AHEAD:
                raise ValueError(
                    f"not_before is further ahead than the longest delay there is, {MAX_AHEAD.days} days"
                )
            due = not_before
        if due is not None and due <= created_at:
            due = None
        return Job(kind=kind, payload=payload, id=job_id, created_at=created_at, not_before=due)

    async def submit(
        self,
        kind: str,
        payload: Any,
        *,
        id: uuid.UUID | str | None = None,
        delay: float | timedelta | None = None,
        not_before: datetime | None = None,
    ) -> uuid.UUID:
        """Publishes one job and waits for the broker's confirm; returns its id.

        The job goes to the jobs exchange with its kind as routing key, ``mandatory``,
        persistent, ``message_id`` = its id. With ``delay`` (seconds or a timedelta) or
        ``not_before`` (an aware datetime) it waits in the broker's delay ladder first (schema
        version 2), exactly as ``shared::delay::route`` sends it.

        Args:
            kind: The job's kind: 1 to 255 bytes, no control characters.
            payload: The kind's input, any JSON value.
            id: The job id (a UUID); a fresh one when ``None``. Re-submitting with the same id
                is how to retry safely.
            delay: Run no earlier than this long from now (at most 366 days).
            not_before: Run no earlier than this time.

        Raises:
            ValueError: See :meth:`new_job`; or a payload JSON cannot carry.
            JobRejected: The broker nacked the job or returned it as unroutable.
            ConfirmTimeout: No confirm came within ``confirm_timeout``.
            TopologyError: An exchange it needs does not exist.
        """
        job = self.new_job(kind, payload, id=id, delay=delay, not_before=not_before)
        outgoing = self._prepare(job)
        await self._publish(outgoing)
        return job.id

    async def submit_job(self, job: Job) -> uuid.UUID:
        """Publishes a :class:`Job` built by hand (or by :meth:`new_job`) and waits for its
        confirm; a job with a ``not_before`` still ahead goes through the delay ladder.

        Raises:
            As :meth:`submit`.
        """
        outgoing = self._prepare(job)
        await self._publish(outgoing)
        return job.id

    async def submit_many(
        self,
        jobs: Iterable[tuple[str, Any] | Job],
        *,
        window: int | None = None,
    ) -> list[uuid.UUID]:
        """Publishes many jobs with pipelined confirms (up to ``window`` unconfirmed at once)
        and returns their ids in order, once the broker confirmed every one.

        Every job is checked and encoded before the first is published, so a bad one raises
        :class:`ValueError` with nothing sent.

        Args:
            jobs: ``(kind, payload)`` pairs, or :class:`Job` objects (for ids, delays, ...).
            window: Unconfirmed publishes at once (default: the client's ``window``).

        Raises:
            ValueError: A bad job (nothing was published).
            JobRejected: Some jobs were not stored (or not confirmed in time):
                ``error.failed`` maps each to its error (:class:`JobRejected`,
                :class:`ConfirmTimeout`, ...), ``error.confirmed`` lists those that were stored.
            TopologyError: An exchange it needs does not exist.
        """
        prepared: list[_Outgoing] = []
        for index, item in enumerate(jobs):
            try:
                if isinstance(item, Job):
                    job = item
                elif isinstance(item, (tuple, list)) and len(item) == 2:
                    job = self.new_job(item[0], item[1])
                else:
                    raise ValueError(f"expected a (kind, payload) pair or a Job, got {type(item).__name__}")
                prepared.append(self._prepare(job))
            except ValueError as error:
                raise ValueError(f"job {index}: {error}") from None
        if not prepared:
            return []
        limit = asyncio.Semaphore(window or self._window)

        async def one(outgoing: _Outgoing) -> None:
            try:
                await self._publish(outgoing)
            finally:
                limit.release()

        tasks: list[asyncio.Task[None]] = []
        try:
            for outgoing in prepared:
                await limit.acquire()
                tasks.append(asyncio.ensure_future(one(outgoing)))
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        failed: dict[uuid.UUID, BaseException] = {}
        for outgoing, outcome in zip(prepared, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed[outgoing.id] = outcome
        if failed:
            first_id, first = next(iter(failed.items()))
            if isinstance(first, TopologyError):
                raise first
            confirmed = [o.id for o in prepared if o.id not in failed]
            raise JobRejected(
                first_id,
                f"{len(failed)} of {len(prepared)} jobs were not stored; the first: {first}",
                confirmed=confirmed,
                failed=failed,
            )
        return [o.id for o in prepared]

    def _prepare(self, job: Job) -> _Outgoing:
        check_kind(job.kind)
        if (job.not_before is not None or job.hop is not None) and job.schema_version < WORKFLOW_SCHEMA_VERSION:
            raise ValueError("a job with not_before or hop must be schema_version 2 or more")
        if (job.fanout is not None or job.fanin is not None) and job.schema_version < FANOUT_SCHEMA_VERSION:
            raise ValueError("a job with fanout or fanin must be schema_version 3")
        if job.not_before is not None:
            if job.not_before.utcoffset() is None:
                raise ValueError("not_before must be timezone-aware")
            if job.not_before - utc_now() > MAX_AHEAD:
                raise ValueError(
                    f"not_before is further ahead than the longest delay there is, {MAX_AHEAD.days} days"
                )
        return _Outgoing(id=job.id, kind=job.kind, body=job.to_bytes(), not_before=job.not_before)

    async def _publish(self, outgoing: _Outgoing) -> None:
        """Publishes one job and awaits its confirm. A publish cut off by a lost connection
        is sent again once the robust connection is back (as the Rust producer republishes
        what was unconfirmed), all within ``confirm_timeout``."""
        if self._closed or self._channel is None:
            raise QueueWorkerError("the client is closed")
        exchange = self._names.jobs_exchange
        backoff = 0.05
        try:
            async with asyncio.timeout(self._confirm_timeout):
                while True:
                    exchange, properties = self._route(outgoing)
                    try:
                        if exchange != self._names.jobs_exchange:
                            await self._ensure_ladder()
                        # Straight to aiormq (the robust channel's current channel): aio_pika's
                        # Message and Exchange layers cost about as much as the publish itself.
                        channel = await self._channel.get_underlay_channel()
                        await channel.basic_publish(
                            outgoing.body,
                            exchange=exchange,
                            routing_key=outgoing.kind,
                            properties=properties,
                            mandatory=True,
                        )
                        return
                    except Exception as error:
                        if not _connection_lost(error):
                            raise
                        if self._closed:
                            raise QueueWorkerError("the client was closed") from None
                        log.info("job %s: connection lost before its confirm (%s); again", outgoing.id, error)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 1.0)
        except aiormq.exceptions.PublishError as error:
            ret = getattr(error.message, "delivery", None)
            raise JobRejected(
                outgoing.id,
                f"returned as unroutable ({getattr(ret, 'reply_code', '?')} {getattr(ret, 'reply_text', '')}): "
                f"no queue takes kind {outgoing.kind!r} on {exchange!r}",
            ) from None
        except aiormq.exceptions.DeliveryError:
            raise JobRejected(outgoing.id, "the broker nacked it") from None
        except TimeoutError:
            raise ConfirmTimeout(outgoing.id, self._confirm_timeout) from None
        except aiormq.exceptions.ChannelNotFoundEntity as error:
            raise TopologyError(
                f"cannot publish to exchange {exchange!r}: {error}; has a consumer of namespace "
                f"{self.namespace!r} started (or connect with declare=True)?"
            ) from None

    def _route(self, outgoing: _Outgoing) -> tuple[str, aiormq.spec.Basic.Properties]:
        """The exchange and properties of a publish of ``outgoing`` now: a job due later
        enters the delay ladder for the wait left (a job sent again later waits less)."""
        exchange = self._names.jobs_exchange
        headers: Mapping[str, str] | None = None
        if outgoing.not_before is not None:
            exchange, headers = self._names.route(outgoing.not_before - utc_now())
        properties = aiormq.spec.Basic.Properties(
            content_type=_CONTENT_TYPE,
            delivery_mode=2,  # persistent
            message_id=str(outgoing.id),
            headers=dict(headers) if headers else None,
        )
        return exchange, properties

    # ------------------------------------------------------------------ results

    async def _start_listener(self, expires: float) -> None:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=500)
        # As producer/src/results.rs: named, durable (a transient non-exclusive queue is
        # deprecated in RabbitMQ 4, and an exclusive one dies with the connection) and
        # deleted by the broker once unused for `expires`.
        queue = await channel.declare_queue(
            self._names.listener_queue(uuid.uuid4().hex),
            durable=True,
            arguments={"x-expires": int(expires * 1000), "x-queue-type": "classic"},
        )
        await queue.bind(self._names.results_exchange, routing_key=MATCH_ALL)
        self._listener_channel = channel
        self._listener_queue = queue
        self._dispatcher = asyncio.create_task(self._dispatch(), name="queue_worker-results")
        self._listener_tag = await queue.consume(self._on_result_message)
        self._listening = True

    async def _on_result_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def _dispatch(self) -> None:
        """Hands each arriving result to its waiters, the streams and the buffer, then acks
        (one ``multiple`` ack per batch)."""
        unacked: AbstractIncomingMessage | None = None
        count = 0
        while True:
            if unacked is not None and (self._inbox.empty() or count >= _ACK_BATCH):
                await _ack(unacked)
                unacked, count = None, 0
            message = await self._inbox.get()
            if message is _CLOSED:
                if unacked is not None:
                    await _ack(unacked)
                return
            try:
                result = JobResult.from_json(message.body)
            except ContractError as error:
                log.warning("ignoring a result that does not follow the contract: %s", error)
            except (RecursionError, MemoryError, ValueError, TypeError) as error:
                # A hostile body (nested 100k deep, ...) must not stop the listener either.
                log.warning("ignoring a result that cannot be read: %r", error)
            else:
                try:
                    await self._deliver(result)
                except Exception:  # never let one result stop the listener
                    log.exception("while handing over the result of job %s", result.job_id)
            unacked = message
            count += 1

    async def _deliver(self, result: JobResult) -> None:
        if self._buffer_size:
            self._buffer[result.job_id] = result
            self._buffer.move_to_end(result.job_id)
            while len(self._buffer) > self._buffer_size:
                self._buffer.popitem(last=False)
        for future in self._waiters.pop(result.job_id, ()):
            if not future.done():
                future.set_result(result)
        for stream in list(self._streams):
            await stream._put(result)

    def _check_listening(self) -> None:
        if self._closed:
            raise QueueWorkerError("the client is closed")
        if not self._listening:
            raise QueueWorkerError("this client does not listen to results: connect with listen=True")

    def try_result(self, job_id: uuid.UUID | str) -> JobResult | None:
        """The result of ``job_id`` if it has arrived (and is still among the last
        ``result_buffer`` results), else ``None``; never waits."""
        self._check_listening()
        return self._buffer.get(as_uuid(job_id))

    async def result(self, job_id: uuid.UUID | str, timeout: float | None = 30.0) -> JobResult:
        """Waits for the result of ``job_id`` and returns it (whatever its status: see
        :meth:`JobResult.raise_for_status`).

        Results published since this client connected are found, whenever they came: the
        client keeps the last ``result_buffer`` of them. A result published before it
        connected is not (read those from the durable ``jobs.results`` queue).

        Args:
            job_id: The job's id.
            timeout: Seconds to wait; ``None`` waits for ever.

        Raises:
            ResultTimeout: No result came within ``timeout``.
            QueueWorkerError: The client was closed meanwhile, or does not listen.
        """
        self._check_listening()
        job_id = as_uuid(job_id)
        found = self._buffer.get(job_id)
        if found is not None:
            return found
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ResultTimeout(job_id, timeout or 0.0) from None
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    del self._waiters[job_id]

    def results(self) -> ResultStream:
        """Every result of the namespace arriving from now on (see :class:`ResultStream`)::

            async with client.results() as stream:
                async for result in stream:
                    ...
        """
        self._check_listening()
        stream = ResultStream(self, self._stream_buffer)
        self._streams.add(stream)
        return stream

    async def wait_all(
        self, job_ids: Iterable[uuid.UUID | str], timeout: float | None = 60.0
    ) -> dict[uuid.UUID, JobResult]:
        """Waits for the results of every job of ``job_ids`` (within one overall
        ``timeout``) and returns them by id.

        Raises:
            ResultTimeout: Not every result came in time (for the first id still missing).
        """
        ids = [as_uuid(i) for i in job_ids]

        async def gather() -> list[JobResult]:
            return await asyncio.gather(*(self.result(i, None) for i in ids))

        try:
            results = await asyncio.wait_for(gather(), timeout)
        except TimeoutError:
            missing = next((i for i in ids if i not in self._buffer), ids[0])
            raise ResultTimeout(missing, timeout or 0.0) from None
        return dict(zip(ids, results, strict=True))


def _connection_lost(error: BaseException) -> bool:
    """Whether a publish failed because the connection or channel went away (worth sending
    again once the robust connection is back), not because the broker refused it."""
    return isinstance(
        error, (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError)
    ) or type(error) is aiormq.exceptions.ChannelClosed


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack(multiple=True)
    except Exception as error:  # its channel is gone: the broker redelivers those results
        log.debug("could not ack results: %s", error)

