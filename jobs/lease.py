"""One job at a time per sink: a lease file `_lease.json` in the sink.

A run creates the lease with an exclusive write (`O_EXCL` on a local path; on S3 a conditional
put, `If-None-Match: *`), so of two runs started together exactly one gets it; the other is refused
with a message naming the holder and when the lease expires. While the job runs, a background
thread renews the lease (after checking that it still names this run); the run deletes it when it
ends. A lease that was not renewed in time, or one whose holder is a process on this host that no
longer exists (a killed driver), is taken over: locally under `flock` on the lease file, on S3 by a
put conditional on the expired lease's ETag (`If-Match`), so two runs cannot both take it over.

On the other stores (gs://, az://, hf://, memory://) the lease is created with fsspec's create-only
write (`mode="create"`), so two runs started together still cannot both get it; renewing, taking
over an expired lease and releasing it read the record, check it, then write or delete it: without
a conditional put there is a moment in which a take-over by two runs at once can both succeed.

Limits: expiry compares wall clocks of different hosts, so hosts sharing a sink need clocks
within a fraction of the lease time; a driver killed on another host blocks the sink until its
lease expires (`RESTYLE_LEASE_SECONDS`, default 120 s).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from operators.base import UserError
from operators.storage import is_local, join, speaks

logger = logging.getLogger(__name__)

LEASE = "_lease.json"
LEASE_SECONDS_VARIABLE = "RESTYLE_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0


LEASE_SECONDS_RANGE = (5.0, 3600.0)


class LeaseSettingError(UserError):
    """A RESTYLE_LEASE_SECONDS that is not a number of seconds in range."""


def lease_seconds() -> float:
    """How long a lease lasts without renewal (renewed every quarter of it)."""
    raw = os.environ.get(LEASE_SECONDS_VARIABLE) or str(DEFAULT_LEASE_SECONDS)
    low, high = LEASE_SECONDS_RANGE
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:  # also refuses nan
        raise LeaseSettingError(f"{LEASE_SECONDS_VARIABLE} is {raw!r}; accepted: seconds from {low:g} to {high:g}")
    return seconds


class LeaseLost(RuntimeError):
    """A write task found that its run no longer holds the sink's lease: it commits nothing."""


def require_lease(filesystem, root: str, run_id: str) -> None:
    """Raise `LeaseLost` unless the sink's lease names `run_id`. Write tasks call this before each
    commit, so a run whose lease was taken over (it stalled past the expiry) cannot commit beside
    the run that took it."""
    path = join(root, LEASE)
    try:
        if is_local(filesystem):
            import fcntl

            with open(path, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_SH)  # the holder rewrites it under LOCK_EX
                data = handle.read()
        else:
            data = filesystem.cat_file(path)
        holder = json.loads(data)
    except FileNotFoundError:
        holder = {}
    except ValueError:
        holder = {"unreadable": True}
    if not isinstance(holder, dict) or holder.get("run_id") != run_id:
        raise LeaseLost(
            f"run {run_id} no longer holds the lease of the sink ({describe_holder(holder or {})}); "
            "nothing more is committed by this run"
        )


class SinkLease:
    """The lease of one run on one sink (see module docstring). `SinkBusy` (raised by `acquire`)
    names the holder; `lost` is set when renewal finds another run's lease in its place."""

    def __init__(self, filesystem, root: str, uri: str, run_id: str, config_hash: str, seconds: float | None = None):
        self.filesystem, self.root, self.uri = filesystem, root, uri
        self.path = join(root, LEASE)
        self.run_id, self.config_hash = run_id, config_hash
        self.seconds = seconds if seconds is not None else lease_seconds()
        self.local = is_local(filesystem)
        # S3 makes replacing and deleting the lease conditional on what was read (ETag); other stores
        # (gs://, az://, hf://, memory://) take a create-only first write, then check-and-write.
        self.conditional = speaks(filesystem, "s3")
        self.started = time.time()
        self.held = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict:
        """What the lease file says about this run."""
        expires = time.time() + self.seconds
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "machine": machine_id(),
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "started": _iso(self.started),
            "expires": expires,
            "expires_at": _iso(expires),
        }

    # Taking, renewing and giving back the lease.

    def acquire(self) -> None:
        """Take the lease or raise `SinkBusy` naming its live holder."""
        for _ in range(20):  # another run may be releasing or replacing it at this moment
            if self._create():
                self.held = True
                return
            # Its own record: a create retried after a transient error that had in fact succeeded.
            outcome = self._replace_if(
                lambda current: current.get("run_id") == self.run_id or _stale(current, time.time()), "take over"
            )
            if outcome is True:
                self.held = True
                return
            if isinstance(outcome, dict):
                raise SinkBusy(self.uri, outcome)
            time.sleep(0.05)
        raise SinkBusy(self.uri, {})

    def renew(self) -> bool:
        """Push the expiry forward if the lease still names this run; otherwise record it as lost."""
        for _ in range(2):  # once more if it changed under the read: a retried write of this run's own
            outcome = self._replace_if(lambda current: current.get("run_id") == self.run_id, "renew")
            if outcome is not None:
                break
        if outcome is True:
            return True
        if isinstance(outcome, dict) or outcome is None:
            holder = describe_holder(outcome or {})
            self.lost = f"the lease of sink.uri {self.uri} was taken by another run ({holder})"
            logger.error("%s; this run's results will not be finalized", self.lost)
        return False

    def release(self) -> None:
        """Delete the lease if it still names this run."""
        self.stop()
        if not self.held:
            return
        self.held = False
        try:
            if self.local:
                with self._locked() as (handle, current):
                    if handle is not None and current.get("run_id") == self.run_id:
                        os.unlink(self.path)
                return
            current, etag = self._read_remote()
            if current is not None and current.get("run_id") == self.run_id:
                if not self.conditional:
                    self.filesystem.rm(self.path)
                    return
                # Conditional on what was just read: a run that took the lease over in between keeps it.
                bucket, key = self.path.split("/", 1)
                self.filesystem.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
                self.filesystem.invalidate_cache(self.path)
        except Exception as error:  # the lease then expires on its own
            logger.warning("sink: cannot remove the lease %s: %s: %s", self.path, type(error).__name__, error)

    def start(self) -> SinkLease:
        """Renew in the background until `stop` or `release`."""
        self._thread = threading.Thread(target=self._renew_loop, name="restyle-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the lease then expires unless released)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                if not self.renew():
                    return
            except Exception as error:  # a failed renewal is retried at the next interval
                logger.warning("sink: cannot renew the lease %s: %s: %s", self.path, type(error).__name__, error)

    # Storage: local files under flock, S3 objects with conditional puts.

    def _create(self) -> bool:
        data = json.dumps(self.record()).encode()
        if self.local:
            import fcntl

            self.filesystem.makedirs(self.root, exist_ok=True)
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        try:
            self.filesystem.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _replace_if(self, wanted, action: str) -> bool | dict | None:
        """Write a fresh record over the current lease if `wanted(current)`; return True when
        written, the current record when not wanted, None when the lease vanished meanwhile."""
        data = json.dumps(self.record()).encode()
        if self.local:
            with self._locked() as (handle, current):
                if handle is None:
                    return None
                if not wanted(current):
                    return current
                if action == "take over" and current.get("run_id") != self.run_id:
                    logger.warning("sink: taking over the expired lease of %s (%s)", self.uri, describe_holder(current))
                handle.seek(0)
                handle.truncate()
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                return True
        current, etag = self._read_remote()
        if current is None:
            return None
        if not wanted(current):
            return current
        if action == "take over" and current.get("run_id") != self.run_id:
            logger.warning("sink: taking over the expired lease of %s (%s)", self.uri, describe_holder(current))
        try:
            if self.conditional:
                self.filesystem.pipe_file(self.path, data, IfMatch=etag)
            else:
                self.filesystem.pipe_file(self.path, data)
        except (FileExistsError, FileNotFoundError):
            return None  # removed since it was read: look again
        except OSError as error:
            if error.errno != errno.EINVAL:  # s3fs's PreconditionFailed: changed since it was read
                raise
            return None
        return True

    @contextlib.contextmanager
    def _locked(self):
        """The local lease file, opened and locked, with its parsed record; (None, {}) if it is gone."""
        import fcntl

        try:
            handle = open(self.path, "r+b")  # noqa: SIM115 (held open while locked)
        except FileNotFoundError:
            yield None, {}
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (and maybe re-created) while this run waited for the lock
                yield None, {}
                return
            yield handle, _parse(handle.read(), os.fstat(handle.fileno()).st_mtime, self.seconds)

    def _read_remote(self) -> tuple[dict | None, str | None]:
        for _ in range(5):
            try:
                before = _etag(self.filesystem.info(self.path, refresh=True))
                data = self.filesystem.cat_file(self.path)
                after = self.filesystem.info(self.path, refresh=True)
            except FileNotFoundError:
                return None, None
            if _etag(after) == before:
                # s3fs's names, else adlfs's: without a modification time an unreadable lease never expires.
                modified = after.get("LastModified") or after.get("last_modified")
                mtime = modified.timestamp() if hasattr(modified, "timestamp") else time.time()
                return _parse(data, mtime, self.seconds), before
        return None, None  # rewritten while read each time: look again


class SinkBusy(Exception):
    """Another run holds the sink's lease (turned into a SinkError by the caller)."""

    def __init__(self, uri: str, holder: dict):
        self.holder = holder
        super().__init__(
            f"sink.uri {uri} is in use by another run ({describe_holder(holder)}); wait for it to finish, or "
            "use another sink.uri"
        )


def describe_holder(holder: dict) -> str:
    """The holder of a lease, in words."""
    if not holder.get("run_id"):
        expires = holder.get("expires")
        until = f"; expires {_iso(expires)}" if expires else ""
        return f"holder unknown, lease file being written or unreadable{until}"
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}, run {holder.get('run_id')}, started "
        f"{holder.get('started')}; lease expires {holder.get('expires_at')}"
    )


def _etag(info: dict) -> str | None:
    """An object's ETag as s3fs (`ETag`) or adlfs (`etag`) reports it."""
    return info.get("ETag") or info.get("etag")


def _parse(data: bytes, mtime: float, seconds: float) -> dict:
    """A lease record; an unreadable one (a run killed while creating it) expires `seconds` after
    it was last written."""
    try:
        record = json.loads(data)
        if isinstance(record, dict) and isinstance(record.get("expires"), (int, float)):
            return record
    except ValueError:
        pass
    return {"expires": mtime + seconds}


def machine_id() -> str:
    """This boot of this machine and this process-id namespace: a host name alone does not tell two
    containers (or two laptops of one name) apart, and a pid means something only within both."""
    parts = []
    for read in (
        lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        lambda: str(os.stat("/proc/self/ns/pid").st_ino),
    ):
        try:
            parts.append(read())
        except OSError:
            parts.append("?")
    return ":".join(parts)


def _stale(record: dict, now: float) -> bool:
    """Expired, or held by a process of this machine (same boot, same pid namespace) that no longer
    exists."""
    if record.get("expires", 0) < now:
        return True
    same_machine = record.get("machine") == machine_id() and "?" not in machine_id()
    if same_machine and record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        if record["pid"] == os.getpid():
            return False  # this process: an earlier run in it that failed to release
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")
