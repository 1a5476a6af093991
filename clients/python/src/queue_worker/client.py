"""The asyncio client: submit jobs, await their results."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self

import aio_pika
import aiormq
import pamqp.exceptions
import yarl
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ._time import utc_now
from .errors import (
    BrokerError,
    ConfirmTimeout,
    ConnectFailed,
    ContractError,
    JobRejected,
    QueueWorkerError,
    ResultTimeout,
    StreamOverflow,
    TopologyError,
)
from .models import FANOUT_SCHEMA_VERSION, WORKFLOW_SCHEMA_VERSION, Job, JobResult, as_uuid
from .topology import LEVELS, MATCH_ALL, MAX_AHEAD, Names, check_kind, level_header, level_ttl

__all__ = ["DEFAULT_MAX_BUFFER_BYTES", "DEFAULT_URL", "Client", "ResultStream"]

log = logging.getLogger("queue_worker")

#: Broker URL used when none is given (the same default as the Rust binaries).
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"

#: Default byte bound of the result buffer and of each results stream (64 MiB of JSON bodies).
DEFAULT_MAX_BUFFER_BYTES = 64 * 1024 * 1024

_CONTENT_TYPE = "application/json"
_ACK_BATCH = 64
_CLOSED: Any = object()

#: What aio-pika, aiormq (and pamqp under it) and the socket raise when the broker or the
#: connection fails; the public coroutines turn these into :class:`BrokerError`.
#: (``TimeoutError`` and ``ConnectionError`` are ``OSError``s; aio-pika raises bare
#: ``RuntimeError`` for a connection or channel that is not open.)
_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    pamqp.exceptions.PAMQPException,
    OSError,
    RuntimeError,
)

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
    that call are never missed, even before iteration starts.

    **A stream nobody reads never holds anything else up.** Results wait in the stream until
    read, at most ``stream_buffer`` of them and ``max_stream_bytes`` bytes of their JSON
    bodies (one result larger than that still goes into an empty stream). The listener lets
    readers run after each result, so a reader that awaits nothing else between results
    keeps up; the bounds are for a reader that stops, or is slower than the results come for
    longer than the bounds last. When a result comes for a stream already at a bound, the
    stream has fallen behind, and it is *detached*: it gets no further result, and the
    client's one results listener goes on serving every :meth:`Client.result` waiter, every
    other stream and the buffer as if the stream were gone. Its reader still gets, in order,
    every result the stream held, then :class:`StreamOverflow` once (``error.job_id`` is the
    first result it missed; it missed every later one too); iteration ends after that. So a
    reader sees a gap-free sequence up to the error, and the error marks where the gap
    begins. The missed results are acknowledged to the broker like every other (they reached
    everyone still listening; the client's buffer keeps them for :meth:`Client.try_result`
    while they last). To keep up, read promptly (hand slow work to other tasks), or connect
    with larger bounds; after an overflow, open a new stream.

    Close a stream you no longer read (``aclose()``, ``async with``), or drop every
    reference to it (the client holds it weakly, so ``async for r in client.results(): ...
    break`` leaves nothing behind). If the connection is closed for good underneath the
    client (``client.connection.close()``), the stream raises :class:`BrokerError` after the
    results it holds; :meth:`Client.close` ends it. Results are at-least-once: after a
    reconnection one may come twice.
    """

    def __init__(self, client: Client, maxsize: int, max_bytes: int) -> None:
        self._items: deque[tuple[JobResult, int]] = deque()
        self._bytes = 0
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self._client = weakref.ref(client)
        self._closed = False  # no more results go in
        self._error: QueueWorkerError | None = None  # raised once the results held are read

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> JobResult:
        while not self._items:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        result, size = self._items.popleft()
        self._bytes -= size
        return result

    async def aclose(self) -> None:
        """Stops the stream: no more results are put in it, those it held are dropped, and
        iteration ends."""
        self._closed = True
        self._error = None
        self._items.clear()
        self._bytes = 0
        self._ready.set()
        client = self._client()
        if client is not None:
            client._streams.discard(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _put(self, result: JobResult, size: int) -> bool:
        """Adds a result without waiting; ``False`` if the stream takes no more (closed, or
        full: then it fails with :class:`StreamOverflow` once what it holds is read)."""
        if self._closed:
            return False
        if self._items and (len(self._items) >= self._maxsize or self._bytes + size > self._max_bytes):
            overflow = StreamOverflow(
                result.job_id,
                waiting=len(self._items),
                waiting_bytes=self._bytes,
                maxsize=self._maxsize,
                max_bytes=self._max_bytes,
            )
            log.warning("%s", overflow)
            self._fail(overflow)
            return False
        self._items.append((result, size))
        self._bytes += size
        self._ready.set()
        return True

    def _fail(self, error: QueueWorkerError) -> None:
        """Ends the stream with ``error``, raised after the results it holds."""
        if not self._closed:
            self._closed = True
            self._error = error
            self._ready.set()

    def _end(self) -> None:
        self._closed = True
        self._ready.set()


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
    declared as ``producer serve`` declares its own: durable, classic, ``x-expires``) and
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
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        max_stream_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
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
        # job id -> (result, size of its body), oldest first.
        self._buffer: OrderedDict[uuid.UUID, tuple[JobResult, int]] = OrderedDict()
        self._buffer_bytes = 0
        self._buffer_size = result_buffer
        self._max_buffer_bytes = max_buffer_bytes
        self._stream_buffer = stream_buffer
        self._max_stream_bytes = max_stream_bytes
        self._waiters: dict[uuid.UUID, list[asyncio.Future[JobResult]]] = {}
        self._streams: weakref.WeakSet[ResultStream] = weakref.WeakSet()
        self._closed = False
        if connection is not None:
            connection.close_callbacks.add(self._on_connection_closed)

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
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        max_stream_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
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
            result_buffer: Results kept for later :meth:`result` calls (the most recent;
                0 keeps none).
            stream_buffer: Results that may wait in each :meth:`results` stream (see
                :class:`ResultStream` for what happens to a stream that falls behind).
            max_buffer_bytes: Bytes of results (their JSON bodies) the buffer of
                ``result_buffer`` keeps at most: beyond either bound the oldest results are
                dropped from it (never one a :meth:`result` call waits for: those are handed
                over on arrival), though the newest is always kept, whatever its size.
            max_stream_bytes: Bytes of results (JSON bodies) that may wait in each
                :meth:`results` stream.
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
            ConnectFailed: The broker cannot be reached (within ``connect_timeout``), or
                refused the login or the virtual host (``__cause__`` says which).
            TopologyError: The namespace's exchanges do not exist (see ``declare``).
            BrokerError: Connected, but the broker refused to set the client up (declaring
                its results queue or the topology: ``ACCESS_REFUSED``, ...).
        """
        names = Names(namespace)
        if queue_type not in ("quorum", "classic"):
            raise ValueError(f"queue_type must be 'quorum' or 'classic', not {queue_type!r}")
        if window < 1 or result_buffer < 0 or stream_buffer < 1:
            raise ValueError("window and stream_buffer must be at least 1, result_buffer at least 0")
        if max_buffer_bytes < 1 or max_stream_bytes < 1:
            raise ValueError("max_buffer_bytes and max_stream_bytes must be at least 1")
        if not 0 < listener_expires * 1000 < 2**32:
            raise ValueError("listener_expires must be above 0 and below 2^32 ms")
        _check_url(url)
        try:
            connection = await aio_pika.connect_robust(
                url,
                timeout=connect_timeout,
                client_properties={"connection_name": connection_name},
                reconnect_interval=reconnect_interval,
            )
        except _BROKER_ERRORS as error:
            if isinstance(error, TimeoutError):
                reason = f"no answer within {connect_timeout:g} s"
            else:
                reason = _describe(error)
            raise ConnectFailed(f"cannot connect to {_redact(url)}: {reason}") from error
        client = cls(
            connection,
            names,
            queue_type=queue_type,
            declare=declare,
            result_buffer=result_buffer,
            stream_buffer=stream_buffer,
            confirm_timeout=confirm_timeout,
            window=window,
            max_buffer_bytes=max_buffer_bytes,
            max_stream_bytes=max_stream_bytes,
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
        except BaseException as error:
            client._closed = True
            if client._dispatcher is not None:
                client._dispatcher.cancel()
            try:
                await connection.close()
            except Exception as closing:  # the error that matters is `error`
                log.debug("could not close the connection: %r", closing)
            if isinstance(error, _BROKER_ERRORS) and not isinstance(error, QueueWorkerError):
                raise BrokerError(
                    f"connected to {_redact(url)}, but the broker refused to set the client up: {_describe(error)}"
                ) from error
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
        Idempotent, and never raises for the broker: what fails while closing (a broker
        already gone, ...) is logged at debug level."""
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
            except asyncio.CancelledError:
                self._dispatcher.cancel()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the caller was cancelled: never swallowed
            except Exception:  # TimeoutError included
                self._dispatcher.cancel()
        if queue is not None and live:
            try:
                await asyncio.wait_for(queue.delete(if_unused=False, if_empty=False), 5)
            except Exception as error:  # best effort: it expires by itself
                log.debug("could not delete the results queue: %s", error)
        try:
            await self._connection.close()
        except Exception as error:  # nothing left to do with it
            log.debug("could not close the connection: %r", error)

    def _connection_gone(self) -> bool:
        """Whether the robust connection was closed for good (not lost: it would come back)."""
        connection = self._connection
        return connection is not None and (connection.is_closed or connection.close_called)

    def _check_open(self) -> None:
        """Raises unless the client and its connection are usable (possibly reconnecting)."""
        if self._closed:
            raise QueueWorkerError("the client is closed")
        if self._connection_gone():
            raise BrokerError(_GONE)

    def _on_connection_closed(self, _sender: object, _error: BaseException | None = None) -> None:
        """Close callback of the robust connection, called on every loss of it: when it is
        closed for good by someone else than :meth:`close`, waits fail and streams end with
        :class:`BrokerError` (nothing can arrive any more) instead of waiting for ever."""
        if self._closed or not self._connection_gone():
            return
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(BrokerError(_GONE))
        for stream in list(self._streams):
            stream._fail(BrokerError(_GONE))
        self._streams.clear()

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
            BrokerError: The broker refused the publish and closed the channel
                (``ACCESS_REFUSED``, ...), or the connection was closed for good.
            QueueWorkerError: The client is closed (or was closed meanwhile).
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
                :class:`ConfirmTimeout`, :class:`BrokerError`, ... as :meth:`submit` raises
                them), ``error.confirmed`` lists those that were stored; ``__cause__`` is the
                first job's error.
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
                f"{len(failed)} of {len(prepared)} jobs were not stored; the first: {_describe(first)}",
                confirmed=confirmed,
                failed=failed,
            ) from first
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
        what was unconfirmed), all within ``confirm_timeout``. Raises only this package's
        exceptions (and ``CancelledError`` when the caller is cancelled)."""
        if self._closed or self._channel is None:
            raise QueueWorkerError("the client is closed")
        exchange = self._names.jobs_exchange
        backoff = 0.05
        try:
            async with asyncio.timeout(self._confirm_timeout):
                while True:
                    self._check_open()
                    exchange, properties = self._route(outgoing)
                    lost: BaseException
                    try:
                        if exchange != self._names.jobs_exchange:
                            await self._ensure_ladder()
                        # Straight to aiormq (the robust channel's current channel): aio_pika's
                        # Message and Exchange layers cost about as much as the publish itself.
                        channel = await self._underlay()
                        await channel.basic_publish(
                            outgoing.body,
                            exchange=exchange,
                            routing_key=outgoing.kind,
                            properties=properties,
                            mandatory=True,
                        )
                        return
                    except asyncio.CancelledError as cancelled:
                        if _cancelling():
                            raise  # the caller's cancellation, or confirm_timeout
                        # aiormq cancels the confirms it awaits when their channel closes.
                        lost = cancelled
                    except Exception as error:
                        if self._closed:
                            # Closed under it: aiormq fails what was in flight with whatever
                            # the close carried (a bare Exception, seen under load).
                            raise QueueWorkerError("the client was closed") from None
                        if not _connection_lost(error):
                            raise
                        lost = error
                    if self._closed:
                        raise QueueWorkerError("the client was closed") from None
                    self._check_open()
                    log.info("job %s: connection lost before its confirm (%r); again", outgoing.id, lost)
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
        except QueueWorkerError:
            raise
        except Exception as error:
            # _BROKER_ERRORS, and anything else aio-pika or aiormq raise: never let their
            # exceptions escape (the README promises only this package's).
            if self._closed:
                raise QueueWorkerError("the client was closed") from None
            raise BrokerError(
                f"job {outgoing.id} (kind {outgoing.kind!r}, to {exchange!r}) failed: {_describe(error)}; it may not "
                f"be stored (submitting it again with the same id is safe)"
            ) from error

    async def _underlay(self) -> aiormq.abc.AbstractChannel:
        """The publish channel's current aiormq channel. While the robust connection
        reconnects this waits for it, but not once it is closed for good (:class:`BrokerError`:
        aio-pika would wait for ever)."""
        assert self._channel is not None
        connection = self._connection
        if connection is not None and not connection.connected.is_set():
            back = asyncio.ensure_future(connection.connected.wait())
            gone = asyncio.ensure_future(connection.closed())
            try:
                await asyncio.wait((back, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                back.cancel()
                gone.cancel()
            self._check_open()
        return await self._channel.get_underlay_channel()

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
        (one ``multiple`` ack per batch). Nothing in it waits for a reader: a stream that
        falls behind is detached (see :class:`ResultStream`), so one slow reader cannot hold
        up the others; the broker's flow control is the prefetch (results received and not
        yet acked). While there are streams it yields after each result, so that their
        readers run between the results of a burst."""
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
                    await self._deliver(result, len(message.body))
                except Exception:  # never let one result stop the listener
                    log.exception("while handing over the result of job %s", result.job_id)
            unacked = message
            count += 1
            if self._streams:
                # Let the streams' readers run before the next result of a burst (the
                # inbox holds up to a prefetch of them): a stream read promptly keeps up
                # whatever its bound.
                await asyncio.sleep(0)

    async def _deliver(self, result: JobResult, size: int | None = None) -> None:
        """Hands one result (``size``: its body's, by default its re-encoded size) to its
        waiters, the buffer and every stream, without waiting for anyone."""
        if size is None:
            size = len(result.to_bytes())
        for future in self._waiters.pop(result.job_id, ()):
            if not future.done():
                future.set_result(result)
        self._keep(result, size)
        for stream in list(self._streams):
            if not stream._put(result, size):
                self._streams.discard(stream)

    def _keep(self, result: JobResult, size: int) -> None:
        """Buffers a result; drops the oldest beyond ``result_buffer`` results or
        ``max_buffer_bytes`` bytes, but always keeps the newest."""
        if not self._buffer_size:
            return
        previous = self._buffer.pop(result.job_id, None)
        if previous is not None:
            self._buffer_bytes -= previous[1]
        self._buffer[result.job_id] = (result, size)
        self._buffer_bytes += size
        while len(self._buffer) > 1 and (
            len(self._buffer) > self._buffer_size or self._buffer_bytes > self._max_buffer_bytes
        ):
            _, (_, dropped) = self._buffer.popitem(last=False)
            self._buffer_bytes -= dropped

    def _buffered(self, job_id: uuid.UUID) -> JobResult | None:
        entry = self._buffer.get(job_id)
        return None if entry is None else entry[0]

    def _check_listening(self) -> None:
        if self._closed:
            raise QueueWorkerError("the client is closed")
        if not self._listening:
            raise QueueWorkerError("this client does not listen to results: connect with listen=True")

    def try_result(self, job_id: uuid.UUID | str) -> JobResult | None:
        """The result of ``job_id`` if it has arrived (and is still in the buffer: among the
        last ``result_buffer`` results, within ``max_buffer_bytes``), else ``None``; never
        waits."""
        self._check_listening()
        return self._buffered(as_uuid(job_id))

    async def result(self, job_id: uuid.UUID | str, timeout: float | None = 30.0) -> JobResult:
        """Waits for the result of ``job_id`` and returns it (whatever its status: see
        :meth:`JobResult.raise_for_status`).

        A result that arrives while this waits is handed over whatever the buffer's bounds.
        One that came before the call is found in the buffer, which keeps the most recent
        results since this client connected: the last ``result_buffer`` of them within
        ``max_buffer_bytes`` bytes (the newest always). A result published before the client
        connected is not seen (read those from the durable ``jobs.results`` queue).

        Args:
            job_id: The job's id.
            timeout: Seconds to wait; ``None`` waits for ever.

        Raises:
            ResultTimeout: No result came within ``timeout``.
            QueueWorkerError: The client was closed meanwhile, or does not listen.
            BrokerError: The connection was closed for good (``client.connection.close()``),
                before or during the wait: no result can come any more.
        """
        self._check_listening()
        job_id = as_uuid(job_id)
        found = self._buffered(job_id)
        if found is not None:
            return found
        self._check_open()
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
        self._check_open()
        stream = ResultStream(self, self._stream_buffer, self._max_stream_bytes)
        self._streams.add(stream)
        return stream

    async def wait_all(
        self, job_ids: Iterable[uuid.UUID | str], timeout: float | None = 60.0
    ) -> dict[uuid.UUID, JobResult]:
        """Waits for the results of every job of ``job_ids`` (within one overall
        ``timeout``) and returns them by id.

        Raises:
            ResultTimeout: Not every result came in time (for the first id still missing).
            QueueWorkerError, BrokerError: As :meth:`result`.
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


_GONE = "the client's connection was closed for good (client.connection.close()); connect a new client"


def _cancelling() -> bool:
    """Whether the current task is being cancelled (rather than an awaited future of a
    library having been cancelled under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_url(url: str) -> None:
    """Raises :class:`ValueError` for a URL aio-pika would retry for ever."""
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError) as error:
        raise ValueError(f"not an AMQP URL: {error}") from None
    if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
        raise ValueError(f"not an AMQP URL (amqp://host or amqps://host): {_redact(url)!r}")


def _redact(url: str) -> str:
    """``url`` without its password."""
    try:
        parsed = yarl.URL(url)
        return str(parsed.with_password("***") if parsed.password else parsed)
    except (TypeError, ValueError):
        return "the broker"


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack(multiple=True)
    except Exception as error:  # its channel is gone: the broker redelivers those results
        log.debug("could not ack results: %s", error)

