"""Exchange and queue names, and the delay ladder: a port of ``shared/src/topology.rs``
(:class:`Names`) and ``shared/src/delay.rs`` (:class:`DelayPlan`).

Every name derives from one namespace: namespace ``t1`` gives ``t1.jobs``, ``t1.jobs.work``,
and so on; the empty namespace gives the documented defaults (``jobs``, ``jobs.work``, ...).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

__all__ = [
    "BUILTIN_KINDS",
    "LEVELS",
    "LEVEL_HEADER_PREFIX",
    "LEVEL_HEADER_VALUE",
    "MATCH_ALL",
    "MAX_AHEAD",
    "MAX_DELAY",
    "MAX_KIND_LEN",
    "MAX_NAMESPACE_LEN",
    "UNIT",
    "DelayPlan",
    "Names",
    "check_kind",
    "check_namespace",
    "level_header",
    "level_label",
    "level_ttl",
]

#: Binding key that matches every routing key on a topic exchange.
MATCH_ALL = "#"
#: Longest kind accepted: it is an AMQP routing key (a short string).
MAX_KIND_LEN = 255
#: Longest namespace accepted (``shared::config::MAX_NAMESPACE_LEN``).
MAX_NAMESPACE_LEN = 200
#: The smallest step of a delay: delays are rounded up to a multiple of it.
UNIT = timedelta(milliseconds=250)
#: Levels of the delay ladder (queues and exchanges ``jobs.delay.<ttl>``).
LEVELS = 25
#: The longest delay the ladder holds in one pass, ``(2^LEVELS - 1) × UNIT`` (about 97 days).
MAX_DELAY = timedelta(milliseconds=((1 << LEVELS) - 1) * 250)
#: The furthest ahead a job may be scheduled: 366 days.
MAX_AHEAD = timedelta(days=366)
#: Prefix of the header that sends a message into a level (``delay-<level>``).
LEVEL_HEADER_PREFIX = "delay-"
#: The value of a level header: the *string* ``"1"``.
LEVEL_HEADER_VALUE = "1"
#: The kinds the stock Rust consumer serves (it declares a ``jobs.kind.<kind>`` queue for each).
BUILTIN_KINDS = ("text.analyze", "http.fetch", "bench.sleep", "bench.fanout")

_UNIT_US = 250_000
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]*\Z")


def check_kind(kind: object) -> str:
    """Checks a kind as the Rust side does (``shared::schema::check_kind``): a string of 1 to
    255 UTF-8 bytes without control characters. Returns it.

    Raises:
        ValueError: Says which rule the kind breaks.
    """
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a string, not {type(kind).__name__}")
    try:
        size = len(kind.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("kind must be valid Unicode (no lone surrogates)") from None
    if size == 0 or size > MAX_KIND_LEN:
        raise ValueError(f"kind must be 1 to {MAX_KIND_LEN} bytes long, got {size}: {kind[:40]!r}")
    if any(unicodedata.category(c) == "Cc" for c in kind):
        raise ValueError(f"kind may not contain control characters: {kind[:40]!r}")
    return kind


def check_namespace(namespace: object) -> str:
    """Checks a namespace as the Rust side does (``shared::config::parse_namespace``): ASCII
    letters, digits, ``.``, ``_`` and ``-``, at most 200 bytes. Returns it.

    Raises:
        ValueError: Says which rule the namespace breaks.
    """
    if not isinstance(namespace, str):
        raise ValueError(f"namespace must be a string, not {type(namespace).__name__}")
    if len(namespace) > MAX_NAMESPACE_LEN:
        raise ValueError(f"namespace is longer than {MAX_NAMESPACE_LEN} bytes")
    if not _NAMESPACE.match(namespace):
        bad = next(c for c in namespace if not re.match(r"[A-Za-z0-9._-]", c))
        raise ValueError(f"namespace may contain only ASCII letters, digits, '.', '_' and '-', not {bad!r}")
    return namespace


def level_ttl(level: int) -> timedelta:
    """How long level ``level`` holds a message: ``2^level × UNIT``."""
    return UNIT * (1 << min(level, LEVELS - 1))


def level_label(level: int) -> str:
    """The name part of a level: its TTL, ``250ms``, ``500ms``, ``1s``, ``2s``, ...
    ``4194304s``."""
    ms = 250 * (1 << min(level, LEVELS - 1))
    return f"{ms}ms" if ms < 1000 else f"{ms // 1000}s"


def level_header(level: int) -> str:
    """The header that sends a message into ``level``'s queue: ``delay-<level>``."""
    return f"{LEVEL_HEADER_PREFIX}{level}"


@dataclass(frozen=True)
class DelayPlan:
    """How a message waits for a delay in the ladder (``shared::delay::Plan``).

    Attributes:
        units: The delay in quarter-seconds, rounded up, at most ``2^25 - 1``.
        entry: The level to publish to: the highest set bit of ``units``.
        levels: The levels the message waits in (every set bit), highest first.
    """

    units: int
    entry: int
    levels: tuple[int, ...]

    @classmethod
    def for_delay(cls, delay: timedelta) -> DelayPlan | None:
        """The plan for ``delay``, rounded up to whole quarter-seconds and capped at
        :data:`MAX_DELAY`; ``None`` when there is nothing to wait (publish straight to the jobs
        exchange)."""
        micros = (delay.days * 86_400 + delay.seconds) * 1_000_000 + delay.microseconds
        if micros <= 0:
            return None
        units = min(-(-micros // _UNIT_US), (1 << LEVELS) - 1)
        levels = tuple(k for k in range(LEVELS - 1, -1, -1) if units >> k & 1)
        return cls(units=units, entry=levels[0], levels=levels)

    @property
    def total(self) -> timedelta:
        """How long the message waits in the ladder."""
        return UNIT * self.units

    def headers(self) -> dict[str, str]:
        """The level headers to set on the message: ``delay-<k>: "1"`` for each set bit."""
        return {level_header(k): LEVEL_HEADER_VALUE for k in self.levels}


class Names:
    """The names of every exchange and queue of one namespace (``shared::topology::Names``).

    Attributes:
        namespace: The namespace (empty for the documented defaults).
        jobs_exchange: Topic exchange jobs are published to; routing key = kind.
        work_queue: Queue of the jobs no kind queue took (``jobs.work``).
        unrouted_exchange: Alternate exchange of the jobs exchange.
        results_exchange: Topic exchange results are published to; routing key = kind.
        results_queue: Durable queue holding every result.
        dead_exchange: Topic exchange of dead letters.
        progress_exchange: Topic exchange of progress events (hops).
        dead_queue: Durable queue holding every dead letter.
    """

    def __init__(self, namespace: str = "") -> None:
        self.namespace = check_namespace(namespace)
        self._prefix = f"{namespace}." if namespace else ""
        p = self._prefix
        self.jobs_exchange = f"{p}jobs"
        self.work_queue = f"{p}jobs.work"
        self.unrouted_exchange = f"{p}jobs.unrouted"
        self.results_exchange = f"{p}jobs.results"
        self.results_queue = f"{p}jobs.results"
        self.dead_exchange = f"{p}jobs.dlx"
        self.progress_exchange = f"{p}jobs.progress"
        self.dead_queue = f"{p}jobs.dead"

    def __repr__(self) -> str:
        return f"Names({self.namespace!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Names) and other.namespace == self.namespace

    def __hash__(self) -> int:
        return hash(self.namespace)

    def kind_queue(self, kind: str) -> str:
        """The queue of one kind, ``jobs.kind.<kind>``."""
        return f"{self._prefix}jobs.kind.{kind}"

    def delay_level(self, level: int) -> str:
        """The exchange and queue of one level of the delay ladder, ``jobs.delay.<ttl>``."""
        return f"{self._prefix}jobs.delay.{level_label(level)}"

    def below(self, level: int) -> str:
        """Where a message that has waited ``level`` goes next: the level below, or the jobs
        exchange after level 0."""
        return self.jobs_exchange if level == 0 else self.delay_level(level - 1)

    def listener_queue(self, suffix: str) -> str:
        """A private results queue, ``jobs.results.wait.<suffix>`` (as ``producer serve``)."""
        return f"{self.results_queue}.wait.{suffix}"

    def route(self, wait: timedelta) -> tuple[str, dict[str, str] | None]:
        """Where a job that must wait ``wait`` is published, and the level headers it carries
        (``shared::delay::route``): the ladder's entry level, or the jobs exchange and no
        headers when there is nothing to wait."""
        plan = DelayPlan.for_delay(wait)
        if plan is None:
            return self.jobs_exchange, None
        return self.delay_level(plan.entry), plan.headers()

    def exchanges(self) -> list[str]:
        """Every exchange of the namespace, the delay ladder's included (for tools that
        delete one)."""
        return [
            self.jobs_exchange,
            self.unrouted_exchange,
            self.results_exchange,
            self.dead_exchange,
            self.progress_exchange,
            *(self.delay_level(k) for k in range(LEVELS)),
        ]

    def queues(self, kinds: Iterable[str] = ()) -> list[str]:
        """Every queue of the namespace: ``jobs.work``, results, dead letters, the delay ladder
        and the queues of ``kinds`` (for tools that delete one)."""
        return [
            self.work_queue,
            self.results_queue,
            self.dead_queue,
            *(self.delay_level(k) for k in range(LEVELS)),
            *(self.kind_queue(k) for k in kinds),
        ]
