"""Fixtures: a real RabbitMQ (``AMQP_URL``, default the local one) and the real Rust consumer
(``CONSUMER_BIN``, default ``target/release/consumer`` of this repository), run as a subprocess
in a fresh namespace per test module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from helpers import AMQP_URL, Consumer, start_consumer, stop_consumer, wait_ready

from queue_worker import Client
from queue_worker.testing import delete_namespace, fresh_namespace


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consumer]:
    """A Rust consumer in a fresh namespace for the test module; stopped (and the namespace
    deleted) at its end."""
    namespace = fresh_namespace("py")
    log = tmp_path_factory.mktemp("consumer") / "consumer.log"
    running = start_consumer(namespace, log)
    try:
        asyncio.run(wait_ready(running))
        yield running
    finally:
        stop_consumer(running)
        try:
            asyncio.run(delete_namespace(AMQP_URL, namespace))
        except Exception as error:  # noqa: BLE001 - unique names: leaving them is harmless
            print(f"could not delete namespace {namespace}: {error}")


@pytest.fixture
async def client(consumer: Consumer) -> AsyncIterator[Client]:
    """A client of the consumer's namespace."""
    async with await Client.connect(consumer.url, consumer.namespace) as connected:
        yield connected
