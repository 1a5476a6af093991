"""RFC 3339 times exactly as the Rust side (the ``time`` crate) reads and writes them."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from .errors import ContractError

__all__ = ["format_rfc3339", "parse_rfc3339", "utc_now"]

_RFC3339 = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[Tt]"
    r"(?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})(?:\.(?P<frac>\d+))?"
    r"(?:(?P<z>[Zz])|(?P<sign>[+-])(?P<oh>\d{2}):(?P<om>\d{2}))\Z"
)


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


def parse_rfc3339(text: object, field: str = "time") -> datetime:
    """Parses an RFC 3339 time such as ``2026-11-25T10:00:00.012Z`` or ``...+02:00``.

    The result is timezone-aware and keeps the offset it was written with. Fractions of a
    second beyond microseconds (the Rust side writes nanoseconds) are truncated, since
    :class:`datetime.datetime` holds microseconds.

    Raises:
        ContractError: ``text`` is not a string holding an RFC 3339 time.
    """
    if not isinstance(text, str):
        raise ContractError(f"{field}: expected an RFC 3339 time string, got {type(text).__name__}")
    match = _RFC3339.match(text)
    if match is None:
        raise ContractError(f"{field}: not an RFC 3339 time: {text!r}")
    frac = match["frac"] or ""
    micro = int((frac + "000000")[:6])
    if match["z"]:
        tz = timezone.utc
    else:
        minutes = int(match["oh"]) * 60 + int(match["om"])
        if int(match["oh"]) > 23 or int(match["om"]) > 59:
            raise ContractError(f"{field}: offset out of range in {text!r}")
        offset = timedelta(minutes=-minutes if match["sign"] == "-" else minutes)
        tz = timezone.utc if minutes == 0 else timezone(offset)
    try:
        return datetime(
            int(match["y"]),
            int(match["mo"]),
            int(match["d"]),
            int(match["h"]),
            int(match["mi"]),
            int(match["s"]),
            micro,
            tzinfo=tz,
        )
    except ValueError as error:
        raise ContractError(f"{field}: invalid time {text!r}: {error}") from None


def format_rfc3339(value: datetime) -> str:
    """Formats a timezone-aware time the way the Rust ``time`` crate does.

    ``YYYY-MM-DDTHH:MM:SS``, then the fraction of a second without trailing zeros (none when
    it is zero), then ``Z`` for a zero offset or ``+HH:MM``/``-HH:MM``.

    Raises:
        ValueError: ``value`` is naive, or its offset is not a whole number of minutes.
    """
    offset = value.utcoffset()
    if offset is None:
        raise ValueError("times on the wire need a timezone: use an aware datetime")
    if offset.microseconds or offset.seconds % 60:
        raise ValueError("an RFC 3339 offset must be a whole number of minutes")
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.year < 1000:  # strftime does not pad years on every platform
        text = f"{value.year:04d}" + text[text.index("-") :]
    if value.microsecond:
        text += "." + f"{value.microsecond:06d}".rstrip("0")
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"
