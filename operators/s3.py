"""s3fs with retries that back off and are counted.

Every S3 client retries transient errors (500, 503 SlowDown, throttling, dropped connections)
with botocore's `standard` mode: exponential backoff with jitter, 8 attempts unless the storage
options say otherwise. An endpoint that cannot be connected to at all (refused, unknown host, no
answer within `CONNECT_TIMEOUT_SECONDS`) is given up on after `CONNECT_ATTEMPTS` attempts with
`StorageUnreachableError`, which names the endpoint's host and nothing else of it. Each retry is
counted: in this process, and, when Ray is running, in a named actor (`retry_counter()`) so the
driver can report the retries of every read and write task in the run summary.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import urlsplit

import s3fs
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from operators.base import UserError

logger = logging.getLogger(__name__)

RETRY_COUNTER_NAME = "restyle_storage_retries"
DEFAULT_RETRIES = {"max_attempts": 8, "mode": "standard"}
CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT_SECONDS = 10


class StorageUnreachableError(ConnectionError, UserError):
    """No connection to the object-storage endpoint could be made. An `OSError`, so that readers and
    sinks report it as their own error, and a `UserError` (a wrong or down endpoint is the user's to fix)."""


_local_retries = 0
_lock = threading.Lock()
_counter_handle = None


class RetryCountingS3FileSystem(s3fs.S3FileSystem):
    """`s3fs.S3FileSystem` whose clients back off on transient errors and count their retries."""

    def __init__(self, *args, **kwargs):
        config = dict(kwargs.pop("config_kwargs", None) or {})
        config.setdefault("retries", dict(DEFAULT_RETRIES))
        config.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
        super().__init__(*args, config_kwargs=config, **kwargs)

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 (s3fs's own signature)
        client = await super().set_session(refresh=refresh, kwargs=kwargs)
        if not getattr(client, "_restyle_counts_retries", False):
            client.meta.events.register("after-call.s3", _count_retries)
            # First, so that it ends the request before the standard handler schedules another try.
            client.meta.events.register_first("needs-retry.s3", _give_up_on_unreachable_endpoint)
            client._restyle_counts_retries = True
        return client


def _give_up_on_unreachable_endpoint(attempts=0, caught_exception=None, endpoint=None, **_) -> None:
    """Stop retrying an endpoint that takes no connection; other errors keep their full retries."""
    if isinstance(caught_exception, BotocoreConnectionError) and attempts >= CONNECT_ATTEMPTS:
        host = urlsplit(getattr(endpoint, "host", "") or "")
        where = f"{host.hostname}:{host.port}" if host.port else (host.hostname or "the default endpoint")
        raise StorageUnreachableError(
            f"cannot connect to object storage at {where} ({type(caught_exception).__name__} after "
            f"{attempts} attempts); check storage.endpoint_url and that the server is running"
        ) from None


def _count_retries(parsed=None, **_) -> None:
    attempts = ((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts") or 0
    if attempts:
        record_retries(attempts)


def record_retries(count: int) -> None:
    """Add retries to this process's count and, under Ray, to the job's counter actor."""
    global _local_retries, _counter_handle
    logger.info("object storage: a request succeeded after %d retries", count)
    import ray

    if ray.is_initialized():
        try:
            if _counter_handle is None:
                _counter_handle = ray.get_actor(RETRY_COUNTER_NAME)
            # Waited for, so the driver's total includes it once the task that retried has finished.
            ray.get(_counter_handle.add.remote(count))
            return
        except Exception:  # no counter in this job, or it is gone: count locally
            _counter_handle = None
    with _lock:
        _local_retries += count


def local_retries() -> int:
    """Retries counted in this process outside Ray."""
    return _local_retries


def retry_counter():
    """The job's retry counter actor (created on first use; it takes no CPU). It lives on the
    driver's node, so losing a worker node does not lose the count."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class RetryCounter:
        def __init__(self):
            self.count = 0

        def add(self, count: int) -> None:
            self.count += count

        def total(self) -> int:
            return self.count

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return RetryCounter.options(
        name=RETRY_COUNTER_NAME, get_if_exists=True, max_restarts=-1, scheduling_strategy=here
    ).remote()


def counted_retries(counter) -> int | None:
    """The counter's total, or None if it cannot be read (the job's result does not depend on it)."""
    import ray

    try:
        return ray.get(counter.total.remote(), timeout=30)
    except Exception as error:  # a lost counter must never fail a job that succeeded
        logger.warning("cannot read the storage retry count: %s", type(error).__name__)
        return None
