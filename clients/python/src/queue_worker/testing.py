"""Helpers for tests and benchmarks: throw-away namespaces.

Not for production namespaces: :func:`delete_namespace` deletes queues with whatever they
hold.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable

import aio_pika

from .topology import BUILTIN_KINDS, Names

__all__ = ["delete_namespace", "fresh_namespace"]

log = logging.getLogger("queue_worker.testing")


def fresh_namespace(prefix: str = "py") -> str:
    """A namespace nobody uses yet: ``<prefix>-<32 hex digits>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def delete_namespace(
    url: str, namespace: str, kinds: Iterable[str] = BUILTIN_KINDS, timeout: float = 30.0
) -> int:
    """Deletes every queue and exchange of ``namespace`` (the kind queues of ``kinds``
    included), with whatever the queues hold; returns how many were deleted. Names that do
    not exist are skipped. The namespace must not be the empty one (the defaults)."""
    if not namespace:
        raise ValueError("refusing to delete the default (empty) namespace")
    names = Names(namespace)
    deleted = 0

    async def run() -> None:
        nonlocal deleted
        connection = await aio_pika.connect(url, timeout=timeout)
        try:
            channel = await connection.channel()
            for queue in names.queues(kinds):
                try:
                    await channel.queue_delete(queue)
                    deleted += 1
                except Exception as error:  # noqa: BLE001 - missing or locked: skip it
                    log.debug("queue %s: %s", queue, error)
                    channel = await connection.channel()
            for exchange in names.exchanges():
                try:
                    await channel.exchange_delete(exchange)
                    deleted += 1
                except Exception as error:  # noqa: BLE001
                    log.debug("exchange %s: %s", exchange, error)
                    channel = await connection.channel()
        finally:
            await connection.close()

    await asyncio.wait_for(run(), timeout)
    return deleted
