"""Committed output: which shards count, resuming after a crash, and the manifest written last.

Each write task writes its shard atomically (a local file is written aside and renamed; an S3
object appears only when its upload completes), then a small commit record
`_commits/<shard>.json` naming the shard, its row count, the config hash, the attempt and the run
id. A shard without a record is not output: it is a crashed attempt's leftover, deleted by the next
run, and its rows are redone; so is a record that cannot be parsed (a warning names it). Shard
names carry the run id (`data/part-aAAAA-RRRRRRRR-TTTTT-SSS.parquet`), so two runs never write the
same name; the sink's lease (jobs/lease.py) keeps a second run out while one is running. A record
may `replace` older shards (`--rerun-failed` rewrites a shard without its error rows); replaced
shards no longer count. `_manifest.json`, written last when every
input is accounted for, lists the committed shards: while it is absent the output is incomplete.

Only restyle's own outputs are ever deleted (`OUTPUT_NAMES`, shard and PNG names under `data/` and
`images/`); `check_sink_location` refuses a sink that overlaps the source, the working directory,
the home directory or a root, before anything is read or written.

Each record also tallies the shard's rows per source fragment and per status (`jobs.fragments`):
resuming and accounting read the records, not the rows, so the driver holds a few numbers per shard
and per fragment, never one per row. A crash loses at most the shards being written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.config import JobConfig, SinkConfig
from jobs.fragments import SOURCE_FRAGMENT, add_tallies, tally
from jobs.hub import CARD, is_restyle_card
from jobs.lease import LEASE
from operators.base import UserError, library_versions
from operators.rows import ERROR
from operators.storage import filesystem_for, is_inside, is_local, join, open_atomically, scheme_of

logger = logging.getLogger(__name__)

COMMITS = "_commits"
MANIFEST = "_manifest.json"
# Everything restyle writes at the top of a sink; `data/`, `images/` and `dicom/` hold only the names below.
WEBDATASET = "webdataset"
# `sink.imagefolder`'s metadata, beside the image files.
IMAGEFOLDER_METADATA = "images/metadata.jsonl"
OUTPUT_NAMES = ("data", "images", "dicom", WEBDATASET, COMMITS, MANIFEST, "summary.json", "report.html", LEASE, CARD)
OUTPUT_FOLDERS = ("data", "images", "dicom", WEBDATASET, COMMITS)
_ATTEMPT = re.compile(r"part-a(\d{4,})-")
_SHARD_FILE = re.compile(r"part-a\d{4,}-[0-9a-z]+-[0-9a-z]+-\d{3}\.parquet|part-a\d{4,}-r?\d{5}-\d{3}\.parquet")
# Exactly what `jobs.sinks.image_file_name` makes: a user's `logo.v2.png` is not ours.
_IMAGE_FILE = re.compile(r"[A-Za-z0-9._-]{1,80}-[0-9a-f]{16}\.v\d+\.(png|webp|jpg)|metadata\.jsonl")
_WEBDATASET_FILE = re.compile(r"part-a\d{4,}-[0-9a-z]+-[0-9a-z]+-\d{3}\.tar")
_DICOM_FILE = re.compile(r"[A-Za-z0-9._-]{1,80}-[0-9a-f]{16}\.v\d+\.dcm")
# A file `open_atomically` was writing when its process died: `.<name>.<8 hex>.tmp`.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
# Fields that decide where and how fast a job runs, not what it writes. `torch_threads` is not one:
# on cpu it changes output bytes. `model_batch_size` (and `batch_size`, which sets it on cuda by
# default) can change the last bits of outputs; the rows record it instead.
_POOL_FIELDS = {"num_actors", "num_cpus", "num_gpus", "batch_size", "device", "model_batch_size"}


class SinkError(UserError):
    """A sink that cannot be written as configured."""


def config_hash(config: JobConfig) -> str:
    """A hash of everything that decides the output rows: source, operators (with their resolved
    device and torch thread count, not their pool sizes, and the installed versions of the libraries
    that shape their bytes), seed, fidelity and the sink's encoding (its defaults resolved). Storage
    settings and secrets are not part of it, so a resume after upgrading torch, diffusers,
    transformers, numpy, Pillow or OpenCV is refused rather than mixing outputs of two versions."""
    operators = []
    for operator in config.operators:
        fields = operator.model_dump(mode="json", exclude=_POOL_FIELDS)
        fields["device"] = operator.resolved_device()
        fields["versions"] = library_versions(operator.output_libraries())
        operators.append(fields)
    identity = {
        "source": config.source.model_dump(mode="json", exclude={"storage"}),
        "operators": operators,
        "seed": config.run.seed,
        "fidelity": config.fidelity.model_dump(mode="json") if config.fidelity else None,
        "encoding": encoding_identity(config.sink.encoding),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def encoding_identity(encoding) -> dict:
    """The sink's encoding as it will run: a changed default level changes the hash too."""
    return {
        "format": encoding.format,
        "png_compress_level": encoding.resolved_png_level() if encoding.format == "png" else None,
        "quality": encoding.resolved_quality(),
    }


@dataclass
class Commit:
    """The record that makes one shard part of the output."""

    shard: str
    rows: int
    config_hash: str
    attempt: int
    replaces: list[str] = field(default_factory=list)
    run_id: str = ""
    # {fragment key: [rows, checksum]} of the shard's rows (`jobs.fragments.tally`).
    fragments: dict[str, list[int]] = field(default_factory=dict)
    # {status: rows} of the shard's rows.
    statuses: dict[str, int] = field(default_factory=dict)


def shard_commit(
    shard: str, table: pa.Table, config_hash: str, attempt: int, run_id: str, replaces: list[str] | None = None
) -> Commit:
    """The commit record of a shard holding `table`'s rows (in output form): their count, and their
    tallies per source fragment (`jobs.fragments.tally`) and per status."""
    return Commit(
        shard,
        table.num_rows,
        config_hash,
        attempt,
        replaces=replaces or [],
        run_id=run_id,
        fragments=tally(table) if SOURCE_FRAGMENT in table.column_names else {},
        statuses=dict(sorted(Counter(table.column("status").to_pylist()).items())),
    )


def shard_name(attempt: int, run_id: str, task: str, index: int) -> str:
    """A shard's path inside the sink: unique per run (run id), write task and shard index."""
    return f"data/part-a{attempt:04d}-{run_id}-{task}-{index:03d}.parquet"


def webdataset_shard_name(shard: str) -> str:
    """The WebDataset tar written with a shard (`sink.webdataset`): `webdataset/<shard's name>.tar`."""
    return f"{WEBDATASET}/{shard.rsplit('/', 1)[-1].removesuffix('.parquet')}.tar"


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
        shards = set(self._list("data"))
        for path in self._list(COMMITS):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") or not name.endswith(".json"):
                continue  # a temporary file or probe a killed run left: removed by remove_leftovers
            try:
                commit = Commit(**json.loads(self.filesystem.cat_file(path)))
                if f"{commit.shard.rsplit('/', 1)[-1]}.json" != name:
                    raise ValueError("the record names another shard")
                if not _well_typed(commit):
                    raise ValueError("a field has the wrong type")
            except (ValueError, TypeError, AttributeError) as error:
                logger.warning("sink: ignoring the unreadable commit record %s (%s); its rows are redone", path, error)
                continue
            if join(self.root, commit.shard) not in shards:
                logger.warning("sink: commit record %s names a missing shard; its rows are redone", path)
                continue
            self.commits[commit.shard] = commit
        replaced = {old for commit in self.commits.values() for old in commit.replaces}
        self.commits = {shard: commit for shard, commit in self.commits.items() if shard not in replaced}

    def _list(self, folder: str) -> list[str]:
        """The files directly in one of the sink's folders (restyle never writes deeper)."""
        return _files_in(self.filesystem, join(self.root, folder))

    @property
    def shards(self) -> list[str]:
        """Paths (inside the filesystem) of the committed shards."""
        return [join(self.root, shard) for shard in sorted(self.commits)]

    def next_attempt(self) -> int:
        """One more than any attempt seen in commits or leftover shards."""
        seen = [commit.attempt for commit in self.commits.values()]
        seen += [
            int(match.group(1)) for path in self._list("data") if (match := _ATTEMPT.match(path.rsplit("/", 1)[-1]))
        ]
        return max(seen, default=0) + 1

    def check_owner(self, job_hash: str, force: bool = False) -> None:
        """Refuse to mix this job's rows with those of a different config, or (unless `force`) with
        files restyle did not write."""
        hashes = {commit.config_hash for commit in self.commits.values()}
        if hashes and hashes != {job_hash}:
            raise SinkError(
                f"sink.uri {self.config.uri} holds output of a different config (hash {sorted(hashes)[0]}, this "
                f"config {job_hash}); results would mix. Use a new sink.uri, or sink.mode: overwrite to replace it"
            )
        if not hashes and not force:
            _, foreign = survey(self.filesystem, self.root)
            if foreign:
                raise SinkError(
                    f"sink.uri {self.config.uri} holds files restyle did not write ({len(foreign)} entries: "
                    f"{', '.join(foreign[:3])}); choose a new uri, or run with --force to write beside them"
                )

    def remove_leftovers(self) -> int:
        """Delete shards without a live commit (a crashed attempt's), stale or unreadable records,
        temporary files and the manifest. Only called while this run holds the sink's lease."""
        live = set(self.shards)
        leftovers = [path for path in self._list("data") if path not in live and _is_ours(path, _SHARD_FILE)]
        live_tars = {join(self.root, webdataset_shard_name(shard)) for shard in self.commits}
        leftovers += [
            path for path in self._list(WEBDATASET) if path not in live_tars and _is_ours(path, _WEBDATASET_FILE)
        ]
        for record in self._list(COMMITS):
            name = record.rsplit("/", 1)[-1]
            if not name.endswith(".json") or "data/" + name.removesuffix(".json") not in self.commits:
                leftovers.append(record)
        manifest = join(self.root, MANIFEST)
        if self.filesystem.exists(manifest):
            leftovers.append(manifest)
        for path in leftovers:
            self.filesystem.rm(path)
        if leftovers:
            logger.info("sink: removed %d uncommitted or superseded files", len(leftovers))
        return len(leftovers)

    def tallies(self) -> dict[str, list[int]]:
        """{fragment key: [rows, checksum]} summed over the live commits (`jobs.fragments`)."""
        total: dict[str, list[int]] = {}
        for commit in self.commits.values():
            add_tallies(total, commit.fragments)
        return total

    def statuses(self) -> Counter:
        """Committed rows per status, from the commit records."""
        counts: Counter = Counter()
        for commit in self.commits.values():
            counts.update(commit.statuses)
        return counts

    @property
    def rows(self) -> int:
        """Committed rows, from the commit records."""
        return sum(commit.rows for commit in self.commits.values())

    def refuse_records_without_tallies(self) -> None:
        """A sink whose records predate per-fragment tallies cannot be resumed or accounted for."""
        old = sorted(shard for shard, commit in self.commits.items() if commit.rows and not commit.fragments)
        if old:
            raise SinkError(
                f"sink.uri {self.config.uri} holds {len(old)} shards whose commit records name no source "
                f"fragments (e.g. {old[0]}), written by an earlier restyle; use a new sink.uri, or "
                "sink.mode: overwrite to replace them"
            )

    def read_fragments(self, columns: list[str], keys: list[str], ids: list[str] | None = None) -> pa.Table:
        """Columns of the committed rows of the fragments named by `keys` (only those of `ids`, if given)."""
        import pyarrow.dataset

        from operators.storage import arrow_filesystem

        shards = [
            join(self.root, shard)
            for shard, commit in sorted(self.commits.items())
            if set(commit.fragments) & set(keys)
        ]
        if not shards:
            return pa.table({name: pa.array([], pa.string()) for name in columns})
        dataset = pyarrow.dataset.dataset(shards, filesystem=arrow_filesystem(self.filesystem), format="parquet")
        wanted = pc.field(SOURCE_FRAGMENT).isin(keys)
        if ids is not None:
            wanted = wanted & pc.field("id").isin(ids)
        # Small batches: only the matching rows are kept, not whole column chunks of every shard.
        return dataset.scanner(
            columns=columns, filter=wanted, batch_size=1024, batch_readahead=1, fragment_readahead=1
        ).to_table()

    def read(self, columns: list[str], ids: list[str] | None = None) -> pa.Table:
        """Columns of the committed rows, optionally only those with the given ids."""
        import pyarrow.dataset

        from operators.storage import arrow_filesystem

        if not self.commits:
            return pa.table({name: pa.array([], pa.string()) for name in columns})
        dataset = pyarrow.dataset.dataset(self.shards, filesystem=arrow_filesystem(self.filesystem), format="parquet")
        return dataset.to_table(columns=columns, filter=pc.field("id").isin(ids) if ids is not None else None)

    def drop_error_rows(self, attempt: int, job_hash: str, run_id: str) -> int:
        """Rewrite each shard holding error rows without them (for `--rerun-failed`); return how many
        rows were dropped. The rewrite is committed before the old shard is removed, so a crash in
        between leaves exactly one live copy of every row. A shard of only error rows is uncommitted
        (its record deleted first), not rewritten empty."""
        dropped = 0
        for index, shard in enumerate(sorted(self.commits)):
            statuses = self.commits[shard].statuses
            if statuses and not statuses.get(ERROR):
                continue  # its record counts no error rows: not read
            table = pq.read_table(join(self.root, shard), filesystem=_arrow(self.filesystem))
            failed = pc.equal(table.column("status"), ERROR)
            count = pc.sum(failed).as_py() or 0
            if not count:
                continue
            kept = table.filter(pc.invert(failed))
            # A shard's WebDataset tar holds only its ok rows: the rewrite's is the same file, renamed.
            tar = join(self.root, webdataset_shard_name(shard))
            has_tar = self.filesystem.exists(tar)
            if kept.num_rows:
                name = shard_name(attempt, run_id, f"r{index:04d}", 0)
                if has_tar:
                    self.filesystem.cp_file(tar, join(self.root, webdataset_shard_name(name)))
                commit = shard_commit(name, kept, job_hash, attempt, run_id, replaces=[shard])
                write_shard(self.filesystem, self.root, name, kept, commit)
                self.commits[name] = commit
            self.filesystem.rm(join(self.root, COMMITS, shard.rsplit("/", 1)[-1] + ".json"))
            self.filesystem.rm(join(self.root, shard))
            if has_tar:
                self.filesystem.rm(tar)
            del self.commits[shard]
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


def survey(filesystem, root: str) -> tuple[list[str], list[str]]:
    """What the sink holds: paths restyle wrote (its outputs, records, leftovers and lease), and
    the entries it did not write, relative to the sink (folders restyle does not use are named once)."""
    if not filesystem.exists(root):
        return [], []
    ours, foreign = [], []
    for path in sorted(filesystem.ls(root, detail=False)):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name in OUTPUT_FOLDERS and filesystem.isdir(path) and not _is_link(filesystem, path):
            pattern = {
                "data": _SHARD_FILE,
                "images": _IMAGE_FILE,
                "dicom": _DICOM_FILE,
                WEBDATASET: _WEBDATASET_FILE,
                COMMITS: re.compile(r".*"),
            }[name]
            files = set(_files_in(filesystem, path))
            for inner in sorted(filesystem.ls(path, detail=False)):
                base = inner.rstrip("/").rsplit("/", 1)[-1]
                if inner in files and (pattern.fullmatch(base) or _TEMPORARY.fullmatch(base)):
                    ours.append(inner)
                else:  # anything else, subfolders and links included, is not restyle's
                    foreign.append(inner.rstrip("/")[len(root.rstrip("/")) + 1 :])
        elif name in (MANIFEST, "summary.json", "report.html", LEASE) or _TEMPORARY.fullmatch(name):
            ours.append(path)
        elif name == CARD and is_restyle_card(filesystem, path):  # a README.md of the user's is theirs
            ours.append(path)
        else:
            foreign.append(name)
    return ours, foreign


def _files_in(filesystem, folder: str) -> list[str]:
    """Regular files directly in `folder` (no subfolders, no symlinks), sorted; none if it is absent."""
    try:
        entries = filesystem.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    return sorted(
        entry["name"]
        for entry in entries
        if entry.get("type") == "file" and not entry.get("islink") and entry["name"].rstrip("/") != folder.rstrip("/")
    )


def _is_link(filesystem, path: str) -> bool:
    return is_local(filesystem) and os.path.islink(path)


def _well_typed(commit: Commit) -> bool:
    """Whether a parsed commit record's fields have the types restyle writes."""
    return (
        isinstance(commit.shard, str)
        and isinstance(commit.rows, int)
        and isinstance(commit.config_hash, str)
        and isinstance(commit.attempt, int)
        and isinstance(commit.replaces, list)
        and all(isinstance(old, str) for old in commit.replaces)
        and isinstance(commit.run_id, str)
        and isinstance(commit.fragments, dict)
        and all(
            isinstance(key, str)
            and isinstance(value, list)
            and len(value) == 2
            and all(isinstance(number, int) and number >= 0 for number in value)
            for key, value in commit.fragments.items()
        )
        and isinstance(commit.statuses, dict)
        and all(isinstance(key, str) and isinstance(value, int) for key, value in commit.statuses.items())
    )


def _is_ours(path: str, pattern: re.Pattern) -> bool:
    """Whether a file is one restyle writes under `pattern`'s name, or one it was writing (a temporary)."""
    name = path.rsplit("/", 1)[-1]
    return bool(pattern.fullmatch(name) or _TEMPORARY.fullmatch(name))


def remove_outputs(filesystem, root: str, paths: list[str]) -> None:
    """Delete restyle's own files found by `survey` (never a folder with anything else in it)."""
    if paths:
        filesystem.rm(paths)
    for folder in OUTPUT_FOLDERS:
        path = join(root, folder)
        if is_local(filesystem) and os.path.isdir(path):
            for directory, _, _ in sorted(os.walk(path), reverse=True):
                with contextlib.suppress(OSError):  # not empty: it holds something that is not ours
                    os.rmdir(directory)
    logger.info("sink: overwrite removed %d files of earlier output", len(paths))


def check_sink_location(config: JobConfig) -> None:
    """Refuse a sink that equals or contains the source, is inside the source (outputs would be read
    as inputs next time), or equals or contains the working directory, the home directory or a
    filesystem or bucket root. Paths are compared resolved: `~` expanded, symlinks followed."""
    uri = config.sink.uri
    scheme, sink = _location(uri)
    if scheme != "file":
        if "/" not in sink.strip("/") and scheme != "memory":
            raise SinkError(
                f"sink.uri {uri} is a bucket root; restyle needs a prefix of its own, e.g. "
                f"{scheme}://{sink.strip('/')}/restyle-out"
            )
    else:
        resolved = f" (resolved: {sink})" if sink != uri else ""
        if sink == "/":
            raise SinkError(f"sink.uri {uri} is a filesystem root{resolved}; choose a folder of its own")
        for what, place in (("the home directory", _real("~")), ("the working directory", _real(os.getcwd()))):
            if is_inside(place, sink):
                relation = "is" if place == sink else f"contains {place},"
                raise SinkError(f"sink.uri {uri}{resolved} {relation} {what}; choose a folder of its own for output")
    source_scheme, source = _location(config.source.uri)
    if source_scheme != scheme:
        return
    if is_inside(source, sink):
        relation = "is the same place as" if source == sink else "contains"
        raise SinkError(
            f"sink.uri {uri} {relation} source.uri {config.source.uri} (resolved: {sink}, {source}); the output "
            "would mix with the input: choose a sink.uri outside the source"
        )
    if is_inside(sink, source):
        raise SinkError(
            f"sink.uri {uri} is inside source.uri {config.source.uri} (resolved: {sink}, {source}); outputs would "
            "be read back as inputs: choose a sink.uri outside the source"
        )


def storage_errors() -> tuple[type[Exception], ...]:
    """Exceptions a filesystem call raises when storage refuses or cannot be reached."""
    errors: tuple[type[Exception], ...] = (OSError,)
    try:
        import botocore.exceptions

        errors += (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
    except ImportError:
        pass
    return errors


def _location(uri: str) -> tuple[str, str]:
    """(scheme, resolved path) of the place `filesystem_for` opens for `uri`."""
    scheme = scheme_of(uri)
    if scheme is not None:
        return scheme, "/".join(part for part in uri.split("://", 1)[1].split("/") if part)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return "file", _real(fsspec.filesystem("file")._strip_protocol(os.path.expanduser(path)))


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _arrow(filesystem):
    from operators.storage import arrow_filesystem

    return arrow_filesystem(filesystem)
