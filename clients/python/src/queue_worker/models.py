"""The wire contract's messages as dataclasses: a port of ``shared/src/schema.rs``.

Every ``from_json`` follows the Rust ``serde`` derive: required fields must be there with the
right JSON type, optional fields may be absent, unknown fields are ignored. Every ``to_json``
writes what the Rust types serialize: the same field names, ``null`` where Rust writes
``null``, and the fields Rust skips when empty (``not_before``, ``hop``, ``fanout``, ``fanin``
on a job; ``hops`` on a result) left out. Times are RFC 3339 (see :mod:`queue_worker._time`).
"""

from __future__ import annotations

import base64
import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Self

from ._time import format_rfc3339, parse_rfc3339, utc_now
from .errors import ContractError, JobFailed

__all__ = [
    "FANOUT_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "WORKFLOW_SCHEMA_VERSION",
    "ChildOf",
    "DeadLetter",
    "FanInCheck",
    "HopState",
    "Job",
    "JobResult",
    "StageTiming",
    "Status",
    "dumps",
]

#: The schema version of plain jobs and of every result.
SCHEMA_VERSION = 1
#: The schema version of a job that carries ``not_before`` or ``hop``.
WORKFLOW_SCHEMA_VERSION = 2
#: The schema version of a job that carries ``fanout`` or ``fanin``.
FANOUT_SCHEMA_VERSION = 3

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

JsonInput = str | bytes | bytearray | memoryview | Mapping[str, Any]


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes, as ``serde_json::to_vec`` writes it (no spaces, non-ASCII
    characters as they are).

    Raises:
        ValueError: ``value`` holds something JSON cannot carry (NaN, infinity, a lone
            surrogate, an object that is not JSON-serializable).
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, UnicodeEncodeError) as error:
        raise ValueError(f"cannot encode as JSON: {error}") from None


def _object(data: JsonInput, what: str) -> Mapping[str, Any]:
    """The JSON object in ``data`` (text, bytes, or an already parsed mapping)."""
    if isinstance(data, Mapping):
        return data
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as error:
        raise ContractError(f"{what}: not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ContractError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


_MISSING: Any = object()


def _field(obj: Mapping[str, Any], key: str, what: str) -> Any:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise ContractError(f"{what}: missing field `{key}`")
    return value


def _int(value: Any, key: str, what: str, maximum: int = _U32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ContractError(f"{what}: `{key}` must be an integer from 0 to {maximum}, got {value!r}")
    return value


def _str(value: Any, key: str, what: str) -> str:
    if not isinstance(value, str):
        raise ContractError(f"{what}: `{key}` must be a string, got {type(value).__name__}")
    return value


def _opt_str(value: Any, key: str, what: str) -> str | None:
    return None if value is None else _str(value, key, what)


def _bool(value: Any, key: str, what: str) -> bool:
    if not isinstance(value, bool):
        raise ContractError(f"{what}: `{key}` must be a boolean, got {value!r}")
    return value


def _uuid(value: Any, key: str, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise ContractError(f"{what}: `{key}` must be a UUID string, got {type(value).__name__}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ContractError(f"{what}: `{key}` is not a UUID: {value!r}") from None


def _time(value: Any, key: str, what: str) -> datetime:
    if isinstance(value, datetime):
        return value
    return parse_rfc3339(value, f"{what}: `{key}`")


def _opt_time(value: Any, key: str, what: str) -> datetime | None:
    return None if value is None else _time(value, key, what)


def _list(value: Any, key: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ContractError(f"{what}: `{key}` must be an array, got {type(value).__name__}")
    return value


def as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    """A job id from a :class:`uuid.UUID` or its text.

    Raises:
        ValueError: ``value`` is not a UUID.
    """
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            raise ValueError(f"a job id must be a UUID, got {value[:60]!r}") from None
    raise ValueError(f"a job id must be a UUID or its text, not {type(value).__name__}")


class _Json:
    """``from_json``/``to_json`` around ``from_dict``/``to_dict``."""

    _WHAT = "message"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: JsonInput) -> Self:
        """Parses JSON text or bytes (or an already parsed mapping).

        Raises:
            ContractError: The JSON is broken or does not follow the wire contract.
        """
        return cls.from_dict(_object(data, cls._WHAT))

    def to_json(self) -> str:
        """Compact JSON text, as the Rust side serializes it."""
        return dumps(self.to_dict()).decode()

    def to_bytes(self) -> bytes:
        """:meth:`to_json` as UTF-8 bytes: a message body."""
        return dumps(self.to_dict())


@dataclass(frozen=True)
class StageTiming(_Json):
    """How long one stage took (``{"name": ..., "micros": ...}``)."""

    _WHAT = "stage"

    name: str
    micros: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parses ``{"name", "micros"}``."""
        w = cls._WHAT
        return cls(
            name=_str(_field(data, "name", w), "name", w),
            micros=_int(_field(data, "micros", w), "micros", w, _U64),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "micros"}``."""
        return {"name": self.name, "micros": self.micros}


def _stages(value: Any, key: str, what: str) -> list[StageTiming]:
    items = _list(value, key, what)
    return [StageTiming.from_dict(_object(item, f"{what}: `{key}`")) for item in items]


@dataclass
class HopState(_Json):
    """On a continuation (schema version 2): where a hopped job comes from.

    Attributes:
        count: Hops taken so far, 1 on the first continuation.
        origin_kind: The kind the producer sent: the final result's ``kind``.
        stages: Every stage that ran in the earlier hops, in order.
    """

    _WHAT = "hop"

    count: int
    origin_kind: str
    stages: list[StageTiming] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parses ``{"count", "origin_kind", "stages"}``."""
        w = cls._WHAT
        return cls(
            count=_int(_field(data, "count", w), "count", w),
            origin_kind=_str(_field(data, "origin_kind", w), "origin_kind", w),
            stages=_stages(_field(data, "stages", w), "stages", w),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"count", "origin_kind", "stages"}``."""
        return {
            "count": self.count,
            "origin_kind": self.origin_kind,
            "stages": [s.to_dict() for s in self.stages],
        }


@dataclass
class ChildOf(_Json):
    """On a child of a fan-out (schema version 3): which fan-out it belongs to."""

    _WHAT = "fanout"

    id: str
    job_id: uuid.UUID
    kind: str
    index: int
    n: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parses ``{"id", "job_id", "kind", "index", "n"}``."""
        w = cls._WHAT
        return cls(
            id=_str(_field(data, "id", w), "id", w),
            job_id=_uuid(_field(data, "job_id", w), "job_id", w),
            kind=_str(_field(data, "kind", w), "kind", w),
            index=_int(_field(data, "index", w), "index", w),
            n=_int(_field(data, "n", w), "n", w),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "job_id", "kind", "index", "n"}``."""
        return {"id": self.id, "job_id": str(self.job_id), "kind": self.kind, "index": self.index, "n": self.n}


@dataclass
class FanInCheck(_Json):
    """On a check of a fan-out's join (schema version 3)."""

    _WHAT = "fanin"

    id: str
    trigger: bool
    n: int
    deadline: datetime
    round: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parses ``{"id", "trigger", "round"?, "n", "deadline"}``."""
        w = cls._WHAT
        round_ = data.get("round", 0)
        return cls(
            id=_str(_field(data, "id", w), "id", w),
            trigger=_bool(_field(data, "trigger", w), "trigger", w),
            round=_int(round_, "round", w),
            n=_int(_field(data, "n", w), "n", w),
            deadline=_time(_field(data, "deadline", w), "deadline", w),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "trigger", "round", "n", "deadline"}``."""
        return {
            "id": self.id,
            "trigger": self.trigger,
            "round": self.round,
            "n": self.n,
            "deadline": format_rfc3339(self.deadline),
        }


@dataclass
class Job(_Json):
    """A job: the body of a message on the jobs exchange.

    Build one with ``Job(kind, payload)`` (a fresh id, created now) and, for a scheduled job,
    ``not_before=...``. ``schema_version`` left at ``None`` becomes the lowest version that
    carries the fields set: 3 with ``fanout``/``fanin``, 2 with ``not_before``/``hop``, else 1.

    Attributes:
        kind: Selects the stage chain; also the routing key.
        payload: Kind-specific input (any JSON value).
        id: Unique job id; also the AMQP ``message_id``.
        created_at: When the job was created (timezone-aware).
        schema_version: 1, 2 or 3 (see above).
        not_before: Version 2: the job must not run before this time.
        hop: Version 2: set on the continuation of a job that hopped to this kind.
        fanout: Version 3: set on a child of a fan-out.
        fanin: Version 3: set on a check of a fan-out's join.
    """

    _WHAT = "job"

    kind: str
    payload: Any
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: datetime = field(default_factory=utc_now)
    schema_version: int = None  # type: ignore[assignment]  # set in __post_init__
    not_before: datetime | None = None
    hop: HopState | None = None
    fanout: ChildOf | None = None
    fanin: FanInCheck | None = None

    def __post_init__(self) -> None:
        if self.schema_version is None:
            if self.fanout is not None or self.fanin is not None:
                self.schema_version = FANOUT_SCHEMA_VERSION
            elif self.not_before is not None or self.hop is not None:
                self.schema_version = WORKFLOW_SCHEMA_VERSION
            else:
                self.schema_version = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parses a job object. ``payload`` must be present (it may be ``null``)."""
        w = cls._WHAT
        hop = data.get("hop")
        fanout = data.get("fanout")
        fanin = data.get("fanin")
        return cls(
            schema_version=_int(_field(data, "schema_version", w), "schema_version", w),
            id=_uuid(_field(data, "id", w), "id", w),
            kind=_str(_field(data, "kind", w), "kind", w),
            created_at=_time(_field(data, "created_at", w), "created_at", w),
            payload=_field(data, "payload", w),
            not_before=_opt_time(data.get("not_before"), "not_before", w),
            hop=None if hop is None else HopState.from_dict(_object(hop, "job: `hop`")),
            fanout=None if fanout is None else ChildOf.from_dict(_object(fanout, "job: `fanout`")),
            fanin=None if fanin is None else FanInCheck.from_dict(_object(fanin, "job: `fanin`")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The job object; ``not_before``, ``hop``, ``fanout`` and ``fanin`` only when set."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "id": str(self.id),
            "kind": self.kind,
            "created_at": format_rfc3339(self.created_at),
            "payload": self.payload,
        }
        if self.not_before is not None:
            out["not_before"] = format_rfc3339(self.not_before)
        if self.hop is not None:
            out["hop"] = self.hop.to_dict()
        if self.fanout is not None:
            out["fanout"] = self.fanout.to_dict()
        if self.fanin is not None:
            out["fanin"] = self.fanin.to_dict()
        return out


class Status(enum.StrEnum):
    """Outcome of a job, as a result says."""

    OK = "ok"
    """Every stage succeeded; ``output`` holds the last stage's output."""
    FAILED = "failed"
    """The job failed for good; ``error`` says why (and the job is in ``jobs.dead``)."""


@dataclass
class JobResult(_Json):
    """A result: the body of a message on the results exchange.

    Attributes:
        job_id: The job this result belongs to.
        kind: The job's kind (the kind the producer sent, for a job that hopped).
        status: :attr:`Status.OK` or :attr:`Status.FAILED`.
        output: The last stage's output when ``ok``, else ``None``.
        error: Why the job failed when ``failed``, else ``None``.
        attempts: Which attempt produced this result, from 1.
        finished_at: When the consumer finished the job.
        job_created_at: The job's ``created_at``; ``None`` when the job could not be read
            (and in results written before the field existed).
        stages: Timing of every stage that ran, in every hop.
        hops: How many times the job hopped to another kind (0 when it did not).
        schema_version: Always 1 for results of this contract.
    """

    _WHAT = "result"

    job_id: uuid.UUID
    kind: str
    status: Status
    output: Any
    error: str | None
    attempts: int
    finished_at: datetime
    job_created_at: datetime | None = None
    stages: list[StageTiming] = field(default_factory=list)
    hops: int = 0
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parses a result object. ``output``, ``error`` and ``job_created_at`` may be
        ``null`` or absent (serde reads a missing ``Option`` as ``None``), ``hops`` absent."""
        w = cls._WHAT
        status = _field(data, "status", w)
        try:
            status = Status(status)
        except ValueError:
            raise ContractError(f"result: `status` must be \"ok\" or \"failed\", got {status!r}") from None
        return cls(
            schema_version=_int(_field(data, "schema_version", w), "schema_version", w),
            job_id=_uuid(_field(data, "job_id", w), "job_id", w),
            kind=_str(_field(data, "kind", w), "kind", w),
            status=status,
            output=data.get("output"),
            error=_opt_str(data.get("error"), "error", w),
            attempts=_int(_field(data, "attempts", w), "attempts", w),
            finished_at=_time(_field(data, "finished_at", w), "finished_at", w),
            job_created_at=_opt_time(data.get("job_created_at"), "job_created_at", w),
            stages=_stages(_field(data, "stages", w), "stages", w),
            hops=_int(data.get("hops", 0), "hops", w),
        )

    def to_dict(self) -> dict[str, Any]:
        """The result object: ``output``, ``error`` and ``job_created_at`` as ``null`` when
        unset, ``hops`` only when not 0."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "job_id": str(self.job_id),
            "kind": self.kind,
            "status": self.status.value,
            "output": self.output,
            "error": self.error,
            "attempts": self.attempts,
            "finished_at": format_rfc3339(self.finished_at),
            "job_created_at": None if self.job_created_at is None else format_rfc3339(self.job_created_at),
            "stages": [s.to_dict() for s in self.stages],
        }
        if self.hops:
            out["hops"] = self.hops
        return out

    @property
    def ok(self) -> bool:
        """Whether the job succeeded."""
        return self.status is Status.OK

    @property
    def latency(self) -> float | None:
        """Seconds from the job's creation to its result (``None`` without
        ``job_created_at``)."""
        if self.job_created_at is None:
            return None
        return (self.finished_at - self.job_created_at).total_seconds()

    def raise_for_status(self) -> Self:
        """Returns the result when it is ``ok``.

        Raises:
            JobFailed: The status is ``failed``.
        """
        if self.status is not Status.OK:
            raise JobFailed(self)
        return self


@dataclass
class DeadLetter(_Json):
    """A dead letter from ``jobs.dead``: the original job message, with the consumer's headers.

    Read one from an AMQP message with :meth:`from_message`. Its JSON form (:meth:`to_json`,
    :meth:`from_json`) is the object ``producer dead list --json`` prints for a letter
    (``job_id``, ``kind``, ``stage``, ``error``, ``attempts``, ``dead_at``, ``bytes``,
    ``is_job``, ``fanin_check``, ``routing_key``) plus the body: ``body`` (text) when it is UTF-8, else
    ``body_base64``.

    Attributes:
        job_id: The body's ``id``, else the ``message_id`` property; ``None`` if neither.
        kind: The body's ``kind`` (``None`` when the body is not a job).
        failed_stage: Header ``x-failed-stage`` (``envelope`` when the message was unreadable).
        error: Header ``x-error``.
        attempts: Header ``x-attempts``.
        dead_at: Header ``x-dead-at`` (seconds since the epoch), else the broker's
            ``x-death`` time.
        body: The original body, byte for byte.
        routing_key: The routing key it died with.
    """

    _WHAT = "dead letter"

    job_id: uuid.UUID | None
    kind: str | None
    failed_stage: str | None
    error: str | None
    attempts: int | None
    dead_at: datetime | None
    body: bytes = b""
    routing_key: str = ""

    @property
    def job(self) -> Job | None:
        """The body as a :class:`Job`, or ``None`` when it is not one."""
        try:
            return Job.from_json(self.body)
        except ContractError:
            return None

    @property
    def is_job(self) -> bool:
        """Whether the body reads as a job (an object with a valid ``id`` and ``kind``)."""
        return _job_fields(self.body) is not None

    @property
    def fanin_check(self) -> bool:
        """Whether it is a fan-in check that died in its join: it cannot be replayed (the
        children's outcomes it joined are gone; ``producer dead replay`` keeps it). A check
        that died before any join (``failed_stage == "envelope"``) is not one."""
        if self.failed_stage == "envelope" or _job_fields(self.body) is None:
            return False
        try:
            body = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("fanin") is not None

    @classmethod
    def from_message(
        cls,
        message: Any = None,
        *,
        body: bytes | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        routing_key: str | None = None,
    ) -> Self:
        """A dead letter from an AMQP message (an ``aio_pika`` message, or anything with
        ``body``, ``headers``, ``message_id`` and ``routing_key``), or from those parts given
        one by one (they override the message's)."""
        if message is not None:
            body = getattr(message, "body", b"") if body is None else body
            headers = getattr(message, "headers", None) if headers is None else headers
            message_id = getattr(message, "message_id", None) if message_id is None else message_id
            routing_key = getattr(message, "routing_key", None) if routing_key is None else routing_key
        body = bytes(body or b"")
        headers = headers or {}
        fields = _job_fields(body)
        job_id = fields[0] if fields else None
        if job_id is None and message_id:
            try:
                job_id = uuid.UUID(str(message_id))
            except ValueError:
                job_id = None
        return cls(
            job_id=job_id,
            kind=fields[1] if fields else None,
            failed_stage=_header_text(headers.get("x-failed-stage")),
            error=_header_text(headers.get("x-error")),
            attempts=_header_int(headers.get("x-attempts")),
            dead_at=_dead_at(headers),
            body=body,
            routing_key=routing_key or "",
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parses the JSON form (see the class docs); ``body``/``body_base64`` may be absent
        (lines of ``producer dead list --json`` have none)."""
        w = cls._WHAT
        job_id = data.get("job_id")
        attempts = data.get("attempts")
        if "body_base64" in data and data["body_base64"] is not None:
            try:
                body = base64.b64decode(_str(data["body_base64"], "body_base64", w), validate=True)
            except ValueError:
                raise ContractError("dead letter: `body_base64` is not base64") from None
        elif data.get("body") is not None:
            body = _str(data["body"], "body", w).encode()
        else:
            body = b""
        if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int)):
            raise ContractError(f"dead letter: `attempts` must be an integer, got {attempts!r}")
        return cls(
            job_id=None if job_id is None else _uuid(job_id, "job_id", w),
            kind=_opt_str(data.get("kind"), "kind", w),
            failed_stage=_opt_str(data.get("stage"), "stage", w),
            error=_opt_str(data.get("error"), "error", w),
            attempts=attempts,
            dead_at=_opt_time(data.get("dead_at"), "dead_at", w),
            body=body,
            routing_key=_str(data.get("routing_key", ""), "routing_key", w),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see the class docs)."""
        out: dict[str, Any] = {
            "job_id": None if self.job_id is None else str(self.job_id),
            "kind": self.kind,
            "stage": self.failed_stage,
            "error": self.error,
            "attempts": self.attempts,
            "dead_at": None if self.dead_at is None else format_rfc3339(self.dead_at),
            "bytes": len(self.body),
            "is_job": self.is_job,
            "fanin_check": self.fanin_check,
            "routing_key": self.routing_key,
        }
        try:
            out["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(self.body).decode()
        return out


def _job_fields(body: bytes) -> tuple[uuid.UUID, str] | None:
    """The ``id`` and ``kind`` of a body that reads as a job (a valid kind included)."""
    from .topology import check_kind

    try:
        obj = _object(body, "dead letter")
        job_id = _uuid(_field(obj, "id", "job"), "id", "job")
        kind = check_kind(_field(obj, "kind", "job"))
    except ValueError:  # ContractError is one
        return None
    return job_id, kind


def _header_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _header_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dead_at(headers: Mapping[str, Any]) -> datetime | None:
    seconds = _header_int(headers.get("x-dead-at"))
    if seconds is not None:
        try:
            return datetime.fromtimestamp(seconds, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    deaths = headers.get("x-death")
    if isinstance(deaths, (list, tuple)) and deaths and isinstance(deaths[0], Mapping):
        when = deaths[0].get("time")
        if isinstance(when, datetime):
            return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return None
