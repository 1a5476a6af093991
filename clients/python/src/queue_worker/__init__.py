"""Python asyncio client for queue-worker: submit jobs to the RabbitMQ job queue that the Rust
``consumer`` runs, and await their results.

The wire contract (names, message bodies, headers) is owned by the Rust crate ``shared``; this
package follows it exactly:

* :class:`Client` publishes jobs (with publisher confirms, ``mandatory``) and listens to
  results;
* :class:`Job`, :class:`JobResult`, :class:`DeadLetter` are the messages, with
  ``from_json``/``to_json``;
* :class:`Names` and :class:`DelayPlan` derive exchange and queue names and the delay ladder's
  route.
"""

from .client import DEFAULT_URL, Client, ResultStream
from .errors import (
    BrokerError,
    ConfirmTimeout,
    ConnectFailed,
    ContractError,
    JobFailed,
    JobRejected,
    QueueWorkerError,
    ResultTimeout,
    StreamOverflow,
    TopologyError,
)
from .models import (
    FANOUT_SCHEMA_VERSION,
    SCHEMA_VERSION,
    WORKFLOW_SCHEMA_VERSION,
    ChildOf,
    DeadLetter,
    FanInCheck,
    HopState,
    Job,
    JobResult,
    StageTiming,
    Status,
)
from .topology import DelayPlan, Names, check_kind

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "FANOUT_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "WORKFLOW_SCHEMA_VERSION",
    "BrokerError",
    "ChildOf",
    "Client",
    "ConfirmTimeout",
    "ConnectFailed",
    "ContractError",
    "DeadLetter",
    "DelayPlan",
    "FanInCheck",
    "HopState",
    "Job",
    "JobFailed",
    "JobRejected",
    "JobResult",
    "Names",
    "QueueWorkerError",
    "ResultStream",
    "ResultTimeout",
    "StageTiming",
    "Status",
    "StreamOverflow",
    "TopologyError",
    "check_kind",
]
