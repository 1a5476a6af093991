#!/usr/bin/env python3
"""Publishing throughput of :meth:`queue_worker.Client.submit_many`.

Submits N small ``text.analyze`` jobs (default 20,000) to a fresh namespace and prints jobs/s
(confirmed by the broker). No consumer is needed: the client declares what a publish needs
(``declare=True``: the exchanges, ``jobs.work`` and the results and dead-letter queues, as
``producer`` does), and the jobs wait in ``jobs.work``; the namespace is deleted afterwards
(unless ``--keep``).

    python bench_submit.py                       # 20,000 jobs, local broker
    python bench_submit.py -n 50000 --window 512 --url amqp://guest:guest@host/%2f
    python bench_submit.py --json                # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from queue_worker import DEFAULT_URL, Client
from queue_worker.testing import delete_namespace, fresh_namespace


async def bench(url: str, n: int, window: int, batch: int, keep: bool, queue_type: str) -> dict[str, float | int | str]:
    namespace = fresh_namespace("bench-py")
    try:
        async with await Client.connect(
            url, namespace, declare=True, listen=False, window=window, queue_type=queue_type  # type: ignore[arg-type]
        ) as client:
            # Warm up (connection, channel, first publishes) outside the measurement.
            await client.submit_many([("text.analyze", {"text": "warm up"})] * min(200, n))
            jobs = [("text.analyze", {"text": f"the quick brown fox {i}"}) for i in range(n)]
            started = time.perf_counter()
            cpu = time.process_time()
            done = 0
            while done < n:
                await client.submit_many(jobs[done : done + batch])
                done += batch
            took = time.perf_counter() - started
            cpu = time.process_time() - cpu
    finally:
        if not keep:
            await delete_namespace(url, namespace)
    return {
        "jobs": n,
        "seconds": round(took, 3),
        "jobs_per_s": round(n / took),
        "client_cpu_s": round(cpu, 3),
        "window": window,
        "queue_type": queue_type,
        "namespace": namespace,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=20_000, help="jobs to submit (20,000)")
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", DEFAULT_URL), help="AMQP URL ($AMQP_URL)")
    parser.add_argument("--window", type=int, default=256, help="unconfirmed publishes at once (256)")
    parser.add_argument("--batch", type=int, default=None, help="jobs per submit_many call (all of them)")
    parser.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--keep", action="store_true", help="leave the namespace (and its jobs) on the broker")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    figures = asyncio.run(
        bench(args.url, args.count, args.window, args.batch or args.count, args.keep, args.queue_type)
    )
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"{figures['jobs']:,} jobs in {figures['seconds']} s: {figures['jobs_per_s']:,} jobs/s "
            f"(window {figures['window']}, {figures['queue_type']} jobs.work; "
            f"client CPU {figures['client_cpu_s']} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
