"""Running the real Rust consumer (``CONSUMER_BIN``) against a real RabbitMQ (``AMQP_URL``)
as a subprocess, in a namespace of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from queue_worker import DEFAULT_URL, Client, JobRejected, TopologyError

REPO = Path(__file__).resolve().parents[3]
AMQP_URL = os.environ.get("AMQP_URL", DEFAULT_URL)
CONSUMER_BIN = os.environ.get("CONSUMER_BIN", str(REPO / "target" / "release" / "consumer"))
READY_TIMEOUT = 60.0


@dataclass
class Consumer:
    """A running Rust consumer."""

    url: str
    namespace: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_consumer(namespace: str, log: Path) -> Consumer:
    """Starts the consumer binary serving ``namespace`` (not waiting for it)."""
    if not Path(CONSUMER_BIN).is_file():
        pytest.fail(f"consumer binary not found at {CONSUMER_BIN}: build it (cargo build --release) or set CONSUMER_BIN")
    env = dict(
        os.environ,
        AMQP_URL=AMQP_URL,
        JOBS_NAMESPACE=namespace,
        CONSUMER_HTTP_ADDR="127.0.0.1:0",
        LOG_FORMAT="pretty",
        NO_COLOR="1",
    )
    out = log.open("wb")
    process = subprocess.Popen(
        [CONSUMER_BIN], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    out.close()
    return Consumer(AMQP_URL, namespace, process, log)


def stop_consumer(consumer: Consumer) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    process = consumer.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def wait_ready(consumer: Consumer, timeout: float = READY_TIMEOUT) -> None:
    """Waits until the consumer has declared the topology and runs a probe job."""
    deadline = time.monotonic() + timeout
    while True:
        if consumer.process.poll() is not None:
            pytest.fail(f"the consumer exited with {consumer.process.returncode}:\n{consumer.log_tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the consumer was not ready within {timeout} s:\n{consumer.log_tail()}")
        try:
            async with await Client.connect(consumer.url, consumer.namespace) as client:
                job_id = await client.submit("text.analyze", {"text": "probe"})
                left = max(1.0, deadline - time.monotonic())
                (await client.result(job_id, timeout=left)).raise_for_status()
                return
        except (TopologyError, JobRejected):
            # Not declared yet, or declared in part: the exchanges come first, then the queues
            # and bindings (a job published in between is unroutable).
            await asyncio.sleep(0.1)
