"""Committed output: which shards count, resuming after a crash, and the manifest written last.

Each write task writes its shard atomically (a local file is written aside and renamed; an S3
object appears only when its upload completes), then a small commit record
`_commits/<shard>.json` naming the shard, its row count, the config hash and the attempt. A shard
without a record is not output: it is a crashed attempt's leftover, deleted by the next run, and
its rows are redone. A record may `replace` older shards (`--rerun-failed` rewrites a shard without
its error rows); replaced shards no longer count. `_manifest.json`, written last when every
input is accounted for, lists the committed shards: while it is absent the output is incomplete.

Limits: the driver holds the committed (id, variant) pairs in memory (about 100 bytes each); the
unit of resumption is a shard, so a crash loses at most the shards being written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.config import JobConfig, SinkConfig
from jobs.storage import filesystem_for, join, open_atomically
from operators.base import UserError

logger = logging.getLogger(__name__)

COMMITS = "_commits"
MANIFEST = "_manifest.json"
_ATTEMPT = re.compile(r"part-a(\d+)-")
# Fields that decide where and how fast a job runs, not what it writes.
_POOL_FIELDS = {"num_actors", "num_cpus", "num_gpus", "batch_size", "device", "model_batch_size"}


class SinkError(UserError):
    """A sink that cannot be written as configured."""


def config_hash(config: JobConfig) -> str:
    """A hash of everything that decides the output rows: source, operators (with their resolved
    device, not their pool sizes), seed and fidelity. Storage settings and secrets are not part of it."""
    operators = []
    for operator in config.operators:
        fields = operator.model_dump(mode="json", exclude=_POOL_FIELDS)
        fields["device"] = operator.resolved_device()
        operators.append(fields)
    identity = {
        "source": config.source.model_dump(mode="json", exclude={"storage"}),
        "operators": operators,
        "seed": config.run.seed,
        "fidelity": config.fidelity.model_dump(mode="json") if config.fidelity else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Commit:
    """The record that makes one shard part of the output."""

    shard: str
    rows: int
    config_hash: str
    attempt: int
    replaces: list[str] = field(default_factory=list)


def commit_shard(filesystem, root: str, commit: Commit) -> None:
    """Write a shard's commit record (after the shard itself is complete)."""
    name = commit.shard.rsplit("/", 1)[-1]
    with open_atomically(filesystem, join(root, COMMITS, f"{name}.json")) as handle:
        handle.write(json.dumps(commit.__dict__).encode())


def write_shard(filesystem, root: str, name: str, table: pa.Table, commit: Commit) -> None:
    """Write one shard atomically, then its commit record."""
    with open_atomically(filesystem, join(root, name)) as handle:
        pq.write_table(table, handle)
    commit_shard(filesystem, root, commit)


class SinkState:
    """What a sink already holds: its live commits, and how to clean, supersede and finish it."""

    def __init__(self, config: SinkConfig):
        self.config = config
        self.filesystem, self.root = filesystem_for(config.uri, config.storage.storage_options())
        self.commits: dict[str, Commit] = {}
        records = self._list(COMMITS)
        for path in records:
            commit = Commit(**json.loads(self.filesystem.cat_file(path)))
            self.commits[commit.shard] = commit
        replaced = {old for commit in self.commits.values() for old in commit.replaces}
        self.commits = {shard: commit for shard, commit in self.commits.items() if shard not in replaced}

    def _list(self, folder: str) -> list[str]:
        path = join(self.root, folder)
        return sorted(self.filesystem.find(path)) if self.filesystem.exists(path) else []

    @property
    def shards(self) -> list[str]:
        """Paths (inside the filesystem) of the committed shards."""
        return [join(self.root, shard) for shard in sorted(self.commits)]

    def next_attempt(self) -> int:
        """One more than any attempt seen in commits or leftover shards."""
        seen = [commit.attempt for commit in self.commits.values()]
        seen += [int(match.group(1)) for path in self._list("data") if (match := _ATTEMPT.search(path))]
        return max(seen, default=0) + 1

    def check_owner(self, job_hash: str) -> None:
        """Refuse to mix this job's rows with those of a different config, or with foreign files."""
        hashes = {commit.config_hash for commit in self.commits.values()}
        if hashes and hashes != {job_hash}:
            raise SinkError(
                f"sink.uri {self.config.uri} holds output of a different config (hash {sorted(hashes)[0]}, this "
                f"config {job_hash}); results would mix. Use a new sink.uri, or sink.mode: overwrite to replace it"
            )
        if not hashes and self.filesystem.exists(self.root):
            foreign = [path for path in self.filesystem.ls(self.root, detail=False) if not _is_ours(path)]
            if foreign:
                raise SinkError(
                    f"sink.uri {self.config.uri} holds files this job did not write ({len(foreign)} entries, e.g. "
                    f"{foreign[0].rsplit('/', 1)[-1]}); choose a new uri or set sink.mode: overwrite"
                )

    def remove_leftovers(self) -> int:
        """Delete shards without a live commit (a crashed attempt's), stale records and the manifest."""
        live = set(self.shards)
        leftovers = [path for path in self._list("data") if path not in live]
        for record in self._list(COMMITS):
            shard = "data/" + record.rsplit("/", 1)[-1].removesuffix(".json")
            if shard not in self.commits:
                leftovers.append(record)
        manifest = join(self.root, MANIFEST)
        if self.filesystem.exists(manifest):
            leftovers.append(manifest)
        for path in leftovers:
            self.filesystem.rm(path)
        if leftovers:
            logger.info("sink: removed %d uncommitted or superseded files", len(leftovers))
        return len(leftovers)

    def read(self, columns: list[str], ids: list[str] | None = None) -> pa.Table:
        """Columns of the committed rows, optionally only those with the given ids."""
        import pyarrow.dataset

        from jobs.storage import arrow_filesystem

        if not self.commits:
            return pa.table({name: pa.array([], pa.string()) for name in columns})
        dataset = pyarrow.dataset.dataset(self.shards, filesystem=arrow_filesystem(self.filesystem), format="parquet")
        return dataset.to_table(columns=columns, filter=pc.field("id").isin(ids) if ids is not None else None)

    def drop_error_rows(self, attempt: int, job_hash: str) -> int:
        """Rewrite each shard holding error rows without them (for `--rerun-failed`); return how many
        rows were dropped. The rewrite is committed before the old shard is removed, so a crash in
        between leaves exactly one live copy of every row."""
        dropped = 0
        for index, shard in enumerate(sorted(self.commits)):
            table = pq.read_table(join(self.root, shard), filesystem=_arrow(self.filesystem))
            failed = pc.equal(table.column("status"), "error")
            count = pc.sum(failed).as_py() or 0
            if not count:
                continue
            kept = table.filter(pc.invert(failed))
            name = f"data/part-a{attempt:04d}-r{index:05d}-000.parquet"
            commit = Commit(name, kept.num_rows, job_hash, attempt, replaces=[shard])
            write_shard(self.filesystem, self.root, name, kept, commit)
            self.filesystem.rm(join(self.root, shard))
            self.filesystem.rm(join(self.root, COMMITS, shard.rsplit("/", 1)[-1] + ".json"))
            del self.commits[shard]
            self.commits[name] = commit
            dropped += count
        return dropped

    def write_manifest(self, job_hash: str, rows: int) -> None:
        """Mark the output complete: every committed shard, its rows, and the config hash."""
        manifest = {
            "config_hash": job_hash,
            "rows": rows,
            "shards": [{"shard": shard, "rows": commit.rows} for shard, commit in sorted(self.commits.items())],
            "complete": True,
        }
        with open_atomically(self.filesystem, join(self.root, MANIFEST)) as handle:
            handle.write(json.dumps(manifest, indent=2).encode())


def _is_ours(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name in ("data", "images", COMMITS, MANIFEST, "summary.json", "report.html")


def _arrow(filesystem):
    from jobs.storage import arrow_filesystem

    return arrow_filesystem(filesystem)


class ProgressLog:
    """Logs committed rows at a steady interval while a job runs: scheduled jobs write to files,
    where Ray's progress bars do not show. Reads only the commit records it has not seen."""

    def __init__(self, config: SinkConfig, attempt: int, already: int, expected: int, interval: float):
        import threading

        self.filesystem, self.root = filesystem_for(config.uri, config.storage.storage_options())
        self.prefix = f"part-a{attempt:04d}-"
        self.already, self.expected, self.interval = already, expected, interval
        self.seen: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="restyle-progress", daemon=True)

    def __enter__(self) -> ProgressLog:
        import time

        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def committed_now(self) -> int:
        """Rows committed so far, this attempt's included."""
        folder = join(self.root, COMMITS)
        names = self.filesystem.ls(folder, detail=False) if self.filesystem.exists(folder) else []
        for path in names:
            if self.prefix in path and path not in self.seen:
                self.seen[path] = json.loads(self.filesystem.cat_file(path))["rows"]
        return self.already + sum(self.seen.values())

    def line(self) -> str:
        """One progress line: committed/expected, rate, time left."""
        import time

        done = self.committed_now()
        elapsed = time.monotonic() - self.started
        rate = (done - self.already) / elapsed if elapsed > 0 else 0.0
        left = f"{(self.expected - done) / rate:.0f} s" if rate > 0 else "unknown"
        percent = 100.0 * done / self.expected if self.expected else 100.0
        return (
            f"progress: {done}/{self.expected} rows committed ({percent:.1f}%), {rate:.2f} rows/s, "
            f"{elapsed:.0f} s elapsed, about {left} left"
        )

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                logger.info(self.line())
            except Exception as error:  # progress must never fail a job
                logger.warning("progress: cannot read commit records: %s", type(error).__name__)
