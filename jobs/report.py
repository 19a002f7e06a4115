"""What the driver writes after a job: the row accounting (`summary.json`) and `report.html`."""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset

from jobs.config import JobConfig, SinkConfig
from jobs.sources import SourceInfo
from operators.rows import OK, STATUSES
from operators.storage import filesystem_for, join, open_atomically

logger = logging.getLogger(__name__)


class AccountingError(RuntimeError):
    """Output rows do not match input rows one for one."""


def account_for_rows(config: JobConfig, plan, info: SourceInfo, state, wall_seconds: float) -> dict:
    """Check that every (row, variant) the job owes appears exactly once in the committed shards
    (`state`, a `jobs.commits.SinkState`) and that every committed shard is this config's, and count
    statuses: from the commit records' tallies (`jobs.fragments`), one comparison per fragment. Only a
    fragment whose tally is off has its committed rows read, to count and name what is wrong (up to
    `EXAMPLES` ids of each problem)."""
    from jobs.commits import config_hash
    from jobs.fragments import expected_tally
    from jobs.pipeline import variants_per_input

    job_hash = config_hash(config)
    foreign = sorted(shard for shard, commit in state.commits.items() if commit.config_hash != job_hash)
    if foreign:
        raise AccountingError(
            f"{len(foreign)} committed shards of sink.uri {config.sink.uri} belong to another config (e.g. "
            f"{foreign[0]}, hash {state.commits[foreign[0]].config_hash}; this config {job_hash})"
        )
    state.refuse_records_without_tallies()
    variants = variants_per_input(config)
    committed = state.tallies()
    problems = {"missing": 0, "duplicated": 0, "unexpected": 0}
    examples: dict[str, list[str]] = {name: [] for name in problems}
    off = [
        (index, fragment)
        for index, fragment in enumerate(info.fragments)
        if tuple(committed.get(fragment.key, (0, 0))) != expected_tally(fragment, variants)
    ]
    for index, fragment in off:
        for name, (count, named) in _fragment_problems(config, state, index, fragment, variants).items():
            problems[name] += count
            examples[name] += named[: EXAMPLES - len(examples[name])]
    planned = {fragment.key for fragment in info.fragments}
    strangers = sorted(key for key in committed if key not in planned)
    if strangers:
        table = state.read_fragments(["id", "variant_index"], strangers)
        problems["unexpected"] += table.num_rows
        examples["unexpected"] += _pairs(table)[: EXAMPLES - len(examples["unexpected"])]
    statuses = state.statuses()
    summary = {
        "source_uri": config.source.uri,
        "sink_uri": config.sink.uri,
        "rows_in": info.row_count,
        "rows_expected": plan.expected_rows,
        "rows_out": state.rows,
        **{status: statuses.get(status, 0) for status in STATUSES},
        "skipped": info.skipped_files,
        **problems,
        "fragments": len(info.fragments),
        "shards": len(state.commits),
        "wall_seconds": round(wall_seconds, 3),
        "images_per_second": round(statuses.get(OK, 0) / wall_seconds, 4) if wall_seconds > 0 else None,
        "seed": config.run.seed,
    }
    if any(problems.values()):
        summary["examples"] = examples
        write_summary(config.sink, summary)
        raise AccountingError(
            "output does not account for every input exactly once: "
            + ", ".join(f"{problems[name]} {name} (e.g. {examples[name][:3]})" for name in problems)
        )
    return summary


EXAMPLES = 20  # ids named per kind of problem in summary.json


def _fragment_problems(config: JobConfig, state, index: int, fragment, variants: int) -> dict:
    """{problem: (count, examples)} for one fragment whose tally is off: its committed (row, variant)
    pairs against every row once per variant (bounded by the fragment's size)."""
    from jobs.fragments import SOURCE_ROW
    from jobs.sources import fragment_ids

    table = state.read_fragments(["id", SOURCE_ROW, "variant_index"], [fragment.key])
    counts = Counter(zip(table.column(SOURCE_ROW).to_pylist(), table.column("variant_index").to_pylist(), strict=True))
    ids = dict(zip(table.column(SOURCE_ROW).to_pylist(), table.column("id").to_pylist(), strict=True))
    expected = {(row, variant) for row in range(fragment.rows) for variant in range(variants)}
    missing = sorted(expected - counts.keys())
    if missing:  # the ids of rows never committed come from the source
        filesystem, root = filesystem_for(config.source.uri, config.source.storage.storage_options())
        ids.update(enumerate(fragment_ids(config.source, filesystem, root, index, fragment)))
    duplicated = sorted(pair for pair, count in counts.items() if count > 1)
    unexpected = sorted(counts.keys() - expected)

    def named(pairs):
        return [f"{ids.get(row, f'{fragment.key}[{row}]')} (variant {variant})" for row, variant in pairs[:EXAMPLES]]

    return {
        "missing": (len(missing), named(missing)),
        "duplicated": (sum(counts[pair] - 1 for pair in duplicated), named(duplicated)),
        "unexpected": (sum(counts[pair] for pair in unexpected), named(unexpected)),
    }


def _pairs(table: pa.Table) -> list[str]:
    return [
        f"{row_id} (variant {variant})"
        for row_id, variant in zip(
            table.column("id").to_pylist(), table.column("variant_index").to_pylist(), strict=True
        )
    ][:EXAMPLES]


def write_summary(sink: SinkConfig, summary: dict) -> str:
    """Write summary.json next to the outputs; return its URI."""
    filesystem, root = filesystem_for(sink.uri, sink.storage.storage_options())
    with open_atomically(filesystem, join(root, "summary.json")) as handle:
        handle.write(json.dumps(summary, indent=2).encode())
    return join(sink.uri, "summary.json")


# What report.html shows, and the bounds that keep it small and its making cheap.
THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 70
IMAGE_BUDGET = 3_500_000  # bytes of inline thumbnails at most; a 1 000-row job's report stays under 5 MB
ERROR_EXAMPLES = 5  # example ids per error message
ERROR_GROUPS = 200  # distinct error messages listed; the rest are counted together
SAMPLED_VALUES = 20_000  # values kept per chart series (evenly spread over the run)
PARAMETER_CHARS = 160  # a longer parameter value is cut in the sample grid
SAMPLE_CHUNK = 32  # sampled inputs whose rows are read at once
FIDELITY_METRICS = ("ssim", "psnr", "histogram_distance")
STEP_SECONDS = ("prepare_seconds", "model_seconds", "finish_seconds")
_HIDDEN_FIELDS = {"node_id"}  # per-row fields that say where a row ran, not what made it


def write_report(config: JobConfig, info: SourceInfo, summary: dict, state) -> str:
    """Write report.html, one self-contained page: figure cards (rows, statuses, rate, wall time, CPU
    and GPU hours per stage), charts as inline SVG (rows committed over time, per-stage seconds per
    row, fidelity metrics with their thresholds), every error and rejection grouped by message, and
    `sink.report_rows` inputs sampled across the whole run (by a hash of their id), each beside all
    its variants. The committed shards are read once, a few small columns at a time, shard by shard;
    only the sampled rows are read whole. Adds each stage's figures (`stage_figures`) to `summary` as
    `stages`."""
    scan = _scan_rows(config, state, config.sink.report_rows)
    summary["stages"] = stage_figures(scan)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>restyle report: {html.escape(config.sink.uri)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head><body>
<header><h1>restyle report</h1><p class=where>{html.escape(config.source.uri)} &rarr;
{html.escape(config.sink.uri)}</p></header>
{_cards_html(config, summary, scan)}
{_skipped_html(info)}
{_charts_html(config, scan, state)}
{_errors_html(scan)}
{_sample_html(config, info, state, scan.sampled())}
<details class=summary><summary>summary.json</summary>
<pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre></details>
</body></html>
"""
    filesystem, root = filesystem_for(config.sink.uri, config.sink.storage.storage_options())
    with open_atomically(filesystem, join(root, "report.html")) as handle:
        handle.write(page.encode())
    return join(config.sink.uri, "report.html")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:0 0 .2em}h2{margin:1.6em 0 .5em;font-size:1.2em}.where{color:#666;margin:0;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .9em;min-width:8em}
.card .value{font-size:1.5em;font-weight:600}.card .label{color:#666;font-size:.85em}
.card.error .value{color:#b00}.card.rejected .value{color:#a60}
.charts{display:flex;flex-wrap:wrap;gap:1em}
.chart{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4em}
.chart svg{display:block;max-width:100%;height:auto}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;font-size:13px;text-align:left}
.sample-grid{display:grid;grid-template-columns:auto 1fr;gap:.8em 1.2em;align-items:start}
.input,.variant{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:4px;font-size:12px}
.variants{display:flex;flex-wrap:wrap;gap:.6em}.variant.error{background:#fff0f0}.variant.rejected{background:#fff8e0}
figure img{display:block;max-width:160px;max-height:160px}
.input figcaption,.variant figcaption{max-width:220px;word-break:break-word}
.chart figcaption{font-weight:600;margin:.2em .4em}
.common dl.parameters{grid-template-columns:repeat(3,auto 1fr);gap:0 1em}
.common{margin-bottom:1em}
mark{background:#ffe680;padding:0 2px}.shared{color:#555;font-size:12px;grid-column:1/-1;margin-top:-.5em}
.message{color:#a00;font-family:monospace}.skipped{color:#555}.note{color:#666}
dl.parameters{margin:.2em 0;display:grid;grid-template-columns:auto 1fr;gap:0 .5em;font-size:12px}
dl.parameters dt{font-weight:600}dl.parameters dd{margin:0;word-break:break-word}
"""


class _Values:
    """An evenly spread sample of at most `SAMPLED_VALUES` numbers of a stream: every `stride`-th,
    the stride doubling (and every other kept value dropped) whenever the sample is full."""

    def __init__(self):
        self.values: list[float] = []
        self.stride = 1
        self.seen = 0

    def add(self, values) -> None:
        start = (-self.seen) % self.stride
        self.values.extend(values[start :: self.stride])
        self.seen += len(values)
        while len(self.values) > SAMPLED_VALUES:
            self.values = self.values[::2]
            self.stride *= 2


@dataclass
class _ErrorGroup:
    status: str
    message: str  # the first message of the group, as written
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class _Scan:
    """What one pass over the committed rows' small columns found."""

    sample_size: int
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # {stage: {step: total seconds}}
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # {stage: {step: rows timed}}
    timings: dict[tuple[str, str], _Values] = field(default_factory=dict)  # {(stage, step): per-row seconds}
    fidelity: dict[str, _Values] = field(default_factory=dict)
    identical: int = 0  # rows whose PSNR is infinite (output equals source)
    groups: dict[tuple[str, str], _ErrorGroup] = field(default_factory=dict)
    other_errors: int = 0  # error rows beyond `ERROR_GROUPS` distinct messages
    heap: list[tuple[int, str]] = field(default_factory=list)  # the sample: (-hash, id), a max-heap
    places: dict[str, tuple[str, int]] = field(default_factory=dict)  # sampled id: (fragment key, row)

    def offer(self, row_id: str, place: tuple[str, int]) -> None:
        """Keep `row_id` if its hash is among the `sample_size` smallest seen."""
        if row_id in self.places or self.sample_size <= 0:
            return
        key = sample_key(row_id)
        if len(self.heap) < self.sample_size:
            heapq.heappush(self.heap, (-key, row_id))
        elif key < -self.heap[0][0]:
            _, dropped = heapq.heapreplace(self.heap, (-key, row_id))
            del self.places[dropped]
        else:
            return
        self.places[row_id] = place

    def error(self, status: str, message: str | None, row_id: str, variant: int) -> None:
        message = message or "(no message)"
        key = (status, error_key(message, row_id))
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= ERROR_GROUPS:
                self.other_errors += 1
                return
            group = self.groups[key] = _ErrorGroup(status, message)
        group.count += 1
        if len(group.examples) < ERROR_EXAMPLES:
            group.examples.append(f"{row_id} (variant {variant})")

    def sampled(self) -> dict[str, tuple[str, int]]:
        """{id: (fragment key, row)} of the sampled inputs, in sample order (smallest hash first)."""
        return {row_id: self.places[row_id] for _, row_id in sorted(self.heap, reverse=True)}


def sample_key(row_id: str) -> int:
    """The number the report's sample is ordered by: a hash of the id, so the sample spreads over
    the whole run and is the same every time the report is written."""
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big")


_HEX = re.compile(r"\b[0-9a-fA-F]{8,}\b")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")


def error_key(message: str, row_id: str) -> str:
    """An error message with what varies from row to row taken out (the row's id, hashes, numbers),
    so that rows failing for the same reason share one group."""
    if row_id:
        message = message.replace(row_id, "{id}")
    return _NUMBER.sub("{n}", _HEX.sub("{hex}", message))


def _scan_rows(config: JobConfig, state, sample_size: int) -> _Scan:
    """One streaming pass over the committed shards: only `id`, `variant_index`, `status`, `error`,
    the provenance columns, the fidelity metrics and each stage's `*_seconds` fields are read, one
    batch at a time."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.fragments import SOURCE_FRAGMENT, SOURCE_ROW

    scan = _Scan(sample_size)
    stages = [operator.stage_name for operator in config.operators]
    metrics = FIDELITY_METRICS if config.fidelity is not None else ()
    for shard in state.shards:
        with state.filesystem.open(shard, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            names = set(schema.names)
            columns = [name for name in ("id", "variant_index", "status", "error") if name in names]
            provenance = SOURCE_FRAGMENT in names and SOURCE_ROW in names
            columns += [SOURCE_FRAGMENT, SOURCE_ROW] if provenance else []
            present = [metric for metric in metrics if metric in names]
            steps = {
                stage: [step for step in STEP_SECONDS if schema.field(stage).type.get_field_index(step) >= 0]
                for stage in stages
                if stage in names and pa.types.is_struct(schema.field(stage).type)
            }
            columns += present + [f"{stage}.{step}" for stage, chosen in steps.items() for step in chosen]
            for batch in parquet.iter_batches(columns=columns, batch_size=4096, use_threads=False):
                ids = batch.column("id").to_pylist()
                statuses = batch.column("status").to_pylist()
                variants = batch.column("variant_index").to_pylist()
                if provenance:
                    fragments = batch.column(SOURCE_FRAGMENT).to_pylist()
                    rows = batch.column(SOURCE_ROW).to_pylist()
                    for row_id, key, row in zip(ids, fragments, rows, strict=True):
                        scan.offer(row_id, (key, row))
                if any(status != OK for status in statuses):
                    errors = batch.column("error").to_pylist()
                    for row_id, variant, status, message in zip(ids, variants, statuses, errors, strict=True):
                        if status != OK:
                            scan.error(status, message, row_id, variant)
                for metric in present:
                    values = batch.column(metric).to_numpy(zero_copy_only=False).astype(np.float64)
                    values = values[~np.isnan(values)]
                    if metric == "psnr":
                        scan.identical += int(np.isinf(values).sum())
                    scan.fidelity.setdefault(metric, _Values()).add(values[np.isfinite(values)].tolist())
                for stage, chosen in steps.items():
                    column = batch.column(stage)
                    for step in chosen:
                        values = pc.struct_field(column, step).to_numpy(zero_copy_only=False).astype(np.float64)
                        values = values[np.isfinite(values)]
                        if values.size:
                            totals = scan.seconds.setdefault(stage, {})
                            totals[step] = totals.get(step, 0.0) + float(values.sum())
                            counts = scan.rows.setdefault(stage, {})
                            counts[step] = counts.get(step, 0) + int(values.size)
                            scan.timings.setdefault((stage, step), _Values()).add(values.tolist())
    return scan


def stage_figures(scan: _Scan) -> dict[str, dict[str, float]]:
    """Per stage, the seconds its rows took in each step and its images per second of model time
    (rows timed / model seconds: the rate of one model step, whatever the pool size)."""
    figures = {}
    for stage, totals in scan.seconds.items():
        model, rows = totals.get("model_seconds", 0.0), scan.rows.get(stage, {}).get("model_seconds", 0)
        figures[stage] = {
            "seconds": {step.removesuffix("_seconds"): round(value, 3) for step, value in totals.items()},
            "images_per_model_second": round(rows / model, 4) if model > 0 else None,
        }
    return figures


def _cards_html(config: JobConfig, summary: dict, scan: _Scan) -> str:
    """The header of figures: rows, statuses, rate, wall time, and per stage the hours its rows took."""

    def card(value, label: str, kind: str = "") -> str:
        shown = "&ndash;" if value is None else html.escape(str(value))
        return (
            f'<div class="card {kind}"><div class=value>{shown}</div><div class=label>{html.escape(label)}</div></div>'
        )

    rows_out = summary.get("rows_out") or 0

    def share(status: str) -> str:
        count = summary.get(status, 0)
        return f"{count} ({100 * count / rows_out:.1f}%)" if rows_out and count else str(count)

    cards = [
        card(summary.get("rows_in"), "rows in"),
        card(f"{rows_out} / {summary.get('rows_expected', rows_out)}", "rows out / expected"),
        card(share("ok"), "ok", "ok"),
        card(share("error"), "error", "error"),
        card(share("rejected"), "rejected", "rejected"),
    ]
    if summary.get("skipped"):
        cards.append(card(summary["skipped"], "files skipped"))
    rate = summary.get("images_per_second")
    cards.append(card(f"{rate:.2f}" if rate is not None else None, "images/s (this run)"))
    cards.append(card(_duration(summary.get("wall_seconds")), "wall time (this run)"))
    devices = {operator.stage_name: operator.resolved_device() for operator in config.operators}
    for stage, totals in scan.seconds.items():
        host = totals.get("prepare_seconds", 0.0) + totals.get("finish_seconds", 0.0)
        model = totals.get("model_seconds", 0.0)
        if devices.get(stage, "cpu") == "cpu":
            cards.append(card(f"{(host + model) / 3600:.3g} h", f"{stage}: CPU hours"))
        else:
            cards.append(card(f"{model / 3600:.3g} h", f"{stage}: GPU hours (model calls)"))
            cards.append(card(f"{host / 3600:.3g} h", f"{stage}: CPU hours (prepare, finish)"))
    return f"<section class=cards>{''.join(cards)}</section>"


def _duration(seconds) -> str | None:
    if seconds is None:
        return None
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _charts_html(config: JobConfig, scan: _Scan, state) -> str:
    """The charts, each an inline SVG drawn here with matplotlib (no script, nothing fetched)."""
    charts = []
    times = _commit_times(state)
    if times:
        charts.append(("rows-committed", "Rows committed over time", _committed_chart(times)))
    if scan.timings:
        charts.append(("stage-seconds", "Seconds per row, by stage and step", _timings_chart(scan.timings)))
    if scan.fidelity and config.fidelity is not None:
        charts.append(("fidelity", "Fidelity", _fidelity_chart(config.fidelity, scan)))
    if not charts:
        return ""
    figures = "".join(
        f'<figure class=chart id="{name}"><figcaption>{html.escape(title)}</figcaption>{svg}</figure>'
        for name, title, svg in charts
    )
    return f"<h2>Charts</h2><section class=charts>{figures}</section>"


def _commit_times(state) -> list[tuple[float, int, int]]:
    """(time, rows, attempt) of every live commit record, by the time its record was written."""
    from jobs.commits import COMMITS

    try:
        entries = state.filesystem.ls(join(state.root, COMMITS), detail=True)
    except (FileNotFoundError, OSError):
        return []
    times = []
    for entry in entries:
        shard = "data/" + entry["name"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
        commit = state.commits.get(shard)
        stamp = _timestamp(entry)
        if commit is not None and stamp is not None:
            times.append((stamp, commit.rows, commit.attempt))
    return sorted(times)


def _timestamp(entry: dict) -> float | None:
    """A listing entry's modification time as seconds since the epoch (local files, S3, memory)."""
    import datetime

    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = entry.get(name)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _figure(width: float = 5.2, height: float = 2.8):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure


def _svg(figure, name: str) -> str:
    """The figure as inline SVG: text kept as text (small), ids salted per chart (several SVGs share
    one page), no date (the same rows draw the same bytes)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"restyle-{name}"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _committed_chart(times: list[tuple[float, int, int]]) -> str:
    import numpy as np

    figure = _figure()
    axes = figure.subplots()
    start = times[0][0]
    elapsed = np.array([stamp - start for stamp, _, _ in times])
    cumulative = np.cumsum([rows for _, rows, _ in times])
    scale, unit = (3600, "h") if elapsed[-1] > 7200 else (60, "min") if elapsed[-1] > 120 else (1, "s")
    axes.step(elapsed / scale, cumulative, where="post", color="#1f77b4", marker=".")
    attempts = sorted({attempt for _, _, attempt in times})
    if len(attempts) > 1:  # resumed runs: mark where each attempt's shards landed
        for attempt in attempts:
            chosen = [index for index, (_, _, seen) in enumerate(times) if seen == attempt]
            axes.plot(elapsed[chosen] / scale, cumulative[chosen], ".", label=f"attempt {attempt}")
        axes.legend(fontsize=8)
    axes.set_xlabel(f"{unit} since the first commit")
    axes.set_ylabel("rows committed")
    axes.grid(alpha=0.3)
    return _svg(figure, "rows-committed")


def _timings_chart(timings: dict[tuple[str, str], _Values]) -> str:
    series = [(f"{stage} {step.removesuffix('_seconds')}", values.values) for (stage, step), values in timings.items()]
    series = [(label, values) for label, values in series if values]
    figure = _figure(5.2, 0.6 + 0.35 * len(series))
    axes = figure.subplots()
    axes.boxplot(
        [values for _, values in series],
        orientation="horizontal",
        tick_labels=[label for label, _ in series],
        whis=(5, 95),
        showfliers=False,
    )
    if all(min(values) > 0 for _, values in series):
        axes.set_xscale("log")
    axes.invert_yaxis()
    axes.set_xlabel("seconds (box: quartiles; whiskers: 5th-95th percentile)")
    axes.grid(alpha=0.3, axis="x")
    return _svg(figure, "stage-seconds")


def _fidelity_chart(fidelity, scan: _Scan) -> str:
    thresholds = {
        "ssim": ("min_ssim", fidelity.min_ssim),
        "psnr": ("min_psnr", fidelity.min_psnr),
        "histogram_distance": ("max_histogram_distance", fidelity.max_histogram_distance),
    }
    shown = [metric for metric in FIDELITY_METRICS if scan.fidelity.get(metric) and scan.fidelity[metric].values]
    figure = _figure(3.2 * max(len(shown), 1), 2.6)
    for axes, metric in zip(figure.subplots(1, max(len(shown), 1), squeeze=False)[0], shown, strict=False):
        axes.hist(scan.fidelity[metric].values, bins=40, color="#4c72b0")
        name, threshold = thresholds[metric]
        if threshold is not None:
            axes.axvline(threshold, color="#c00", linestyle="--", label=f"{name} {threshold:g}")
            axes.legend(fontsize=8)
        label = "psnr (dB)" if metric == "psnr" else metric
        if metric == "psnr" and scan.identical:
            label += f"; {scan.identical} identical (infinite) not drawn"
        axes.set_xlabel(label, fontsize=9)
        axes.set_ylabel("rows")
    return _svg(figure, "fidelity")


def _errors_html(scan: _Scan) -> str:
    """Every error and rejected row, grouped by message, with counts and example ids."""
    if not scan.groups:
        return "<h2>Errors</h2><p class=note>No error or rejected rows.</p>"
    rows = []
    for group in sorted(scan.groups.values(), key=lambda group: (-group.count, group.status, group.message)):
        examples = ", ".join(html.escape(example) for example in group.examples)
        rows.append(
            f"<tr class={group.status}><td>{group.count}</td><td>{group.status}</td>"
            f"<td class=message>{html.escape(group.message)}</td><td>{examples}</td></tr>"
        )
    other = (
        f"<p class=note>{scan.other_errors} more rows failed with other messages (only the first {ERROR_GROUPS} "
        "distinct messages are listed).</p>"
        if scan.other_errors
        else ""
    )
    return (
        "<h2>Errors</h2><table class=errors><tr><th>rows</th><th>status</th><th>message (first of the group)</th>"
        f"<th>example ids</th></tr>{''.join(rows)}</table>{other}"
    )


def _chunks(wanted: dict[str, tuple[str, int]]) -> list[dict[str, tuple[str, int]]]:
    """The sampled inputs in groups of whole fragments, about `SAMPLE_CHUNK` inputs each: what is
    read at once (a fragment is never split, so each is read once)."""
    by_key: dict[str, dict[str, tuple[str, int]]] = {}
    for row_id, place in wanted.items():
        by_key.setdefault(place[0], {})[row_id] = place
    chunks, current = [], {}
    for key in sorted(by_key):
        current.update(by_key[key])
        if len(current) >= SAMPLE_CHUNK:
            chunks.append(current)
            current = {}
    return chunks + ([current] if current else [])


def _sampled_outputs(config: JobConfig, state, chunk: dict[str, tuple[str, int]], columns: list[str]) -> pa.Table:
    """`columns` of the output rows of one chunk of sampled inputs, from the shards that hold them."""
    keys = sorted({key for key, _ in chunk.values()})
    return state.read_fragments(columns, keys, ids=list(chunk))


def _sampled_inputs(
    config: JobConfig, info: SourceInfo, chunk: dict[str, tuple[str, int]]
) -> dict[str, bytes | dict | None]:
    """{id: source image} of one chunk of sampled inputs, each fragment read once for just its sampled
    rows. A refused input (a link out of the folder, say) is never read, not even for a thumbnail."""
    from jobs.sources import read_fragment

    source = config.source
    filesystem, root = filesystem_for(source.uri, source.storage.storage_options())
    planned = {fragment.key: (index, fragment) for index, fragment in enumerate(info.fragments)}
    rows_by_key: dict[str, set[int]] = {}
    for key, row in chunk.values():
        rows_by_key.setdefault(key, set()).add(row)
    shown: dict[str, bytes | dict | None] = {}
    for key, rows in sorted(rows_by_key.items()):
        if key not in planned:
            continue
        index, fragment = planned[key]
        try:
            table = read_fragment(
                source, filesystem, root, index, fragment, {}, skip_rows=frozenset(range(fragment.rows)) - rows
            )
        except Exception as error:  # the report shows what it can; a source changed since is not fatal
            logger.warning("report: cannot read the sampled inputs of %s: %s", key, type(error).__name__)
            continue
        shown.update(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True))
    return shown


def _parameters(config: JobConfig, row: dict) -> dict[str, str]:
    """What made one output row, flattened for display: seed, size, fidelity metrics and each
    stage's record (its timings and where it ran left out)."""
    shown = {"seed": row.get("seed"), "size": f"{row['width']}x{row['height']}" if row.get("width") else None}
    if config.fidelity is not None:
        shown.update({metric: row.get(metric) for metric in FIDELITY_METRICS})
    for operator in config.operators:
        record = row.get(operator.stage_name) or {}
        for key, value in record.items():
            if key.endswith("_seconds") or key in _HIDDEN_FIELDS:
                continue
            shown[f"{operator.stage_name}.{key}"] = value
    return {key: _shown_value(value) for key, value in shown.items() if value is not None}


def _shown_value(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, bytes):
        text = f"{len(value)} bytes"
    elif isinstance(value, dict | list):
        text = json.dumps(value, default=lambda item: f"{len(item)} bytes" if isinstance(item, bytes) else str(item))
    else:
        text = str(value)
    return text if len(text) <= PARAMETER_CHARS else text[: PARAMETER_CHARS - 1] + "\u2026"


def _parameter_list(parameters: dict[str, str], marked: bool = False) -> str:
    if not parameters:
        return ""
    wrap = (lambda text: f"<mark>{text}</mark>") if marked else (lambda text: text)
    items = "".join(
        f"<dt>{html.escape(key)}</dt><dd>{wrap(html.escape(value))}</dd>" for key, value in parameters.items()
    )
    return f"<dl class=parameters>{items}</dl>"


def _sample_html(config: JobConfig, info: SourceInfo, state, wanted: dict[str, tuple[str, int]]) -> str:
    """The sampled inputs, each once beside all its variants: per variant only the parameters that
    differ between the variants (highlighted); those the variants share once below the row, and
    those every sampled row shares once above the grid. Read in chunks of whole fragments: first
    the parameters of every sampled row, then thumbnails until `IMAGE_BUDGET` bytes of them."""
    if not wanted:
        return ""
    stage_names = [operator.stage_name for operator in config.operators]
    metrics = list(FIDELITY_METRICS) if config.fidelity is not None else []
    columns = ["id", "variant_index", "status", "error", "seed", "width", "height", *metrics, *stage_names]
    outputs: dict[str, list[dict]] = {row_id: [] for row_id in wanted}
    chunks = _chunks(wanted)
    for chunk in chunks:
        for row in _sampled_outputs(config, state, chunk, columns).to_pylist():
            outputs[row["id"]].append(
                {
                    "variant": row["variant_index"],
                    "status": row["status"],
                    "error": row["error"],
                    "parameters": _parameters(config, row),
                }
            )
    thumbnails: dict[tuple[str, int | None], str] = {}
    budget = IMAGE_BUDGET
    for chunk in chunks:
        if budget <= 0:
            break
        for row_id, data in _sampled_inputs(config, info, chunk).items():
            if budget > 0:
                thumbnails[row_id, None] = tag = _thumbnail(data, config.source.max_image_pixels, row_id)
                budget -= len(tag)
        table = _sampled_outputs(config, state, chunk, ["id", "variant_index", "image"])
        for row in table.to_pylist():
            if budget > 0:
                data = row["image"]["bytes"] if row["image"] else None
                label = f"{row['id']} variant {row['variant_index']}"
                thumbnails[row["id"], row["variant_index"]] = tag = _thumbnail(data, label=label)
                budget -= len(tag)
    unshown = len(wanted) + sum(len(variants) for variants in outputs.values()) - len(thumbnails)
    not_shown = "<i class=unshown>not shown</i>"

    every = [variant["parameters"] for variants in outputs.values() for variant in variants]
    common = {}
    if len(every) > 1:
        common = {key: value for key, value in every[0].items() if all(other.get(key) == value for other in every)}
    cells = []
    for row_id in wanted:
        variants = sorted(outputs[row_id], key=lambda variant: variant["variant"])
        own = [
            {key: value for key, value in variant["parameters"].items() if key not in common} for variant in variants
        ]
        shared = {}
        if own:
            shared = {key: value for key, value in own[0].items() if all(other.get(key) == value for other in own)}
        figures = []
        for variant, parameters in zip(variants, own, strict=True):
            differing = {key: value for key, value in parameters.items() if key not in shared}
            error = f"<div class=message>{html.escape(variant['error'])}</div>" if variant["error"] else ""
            figures.append(
                f'<figure class="variant {html.escape(variant["status"])}">'
                f"{thumbnails.get((row_id, variant['variant']), not_shown)}"
                f"<figcaption>variant {variant['variant']} &middot; {html.escape(variant['status'])}{error}"
                f"{_parameter_list(differing, marked=len(variants) > 1)}</figcaption></figure>"
            )
        if not figures:
            figures.append("<p class=note>no committed output</p>")
        cells.append(
            f"<figure class=input>{thumbnails.get((row_id, None), not_shown)}"
            f"<figcaption>{html.escape(row_id)}</figcaption></figure><div class=variants>{''.join(figures)}</div>"
        )
        if shared:
            cells.append(f"<div class=shared>shared by its variants: {_parameter_list(shared)}</div>")
    heading = (
        f"<h2>Sample of outputs</h2><p class=note>{len(wanted)} inputs chosen across the whole run by a hash of "
        "their id, each beside all its variants; parameters that differ between variants are highlighted.</p>"
    )
    common_html = f"<div class=common>Shared by every row shown: {_parameter_list(common)}</div>" if common else ""
    spent = (
        f"<p class=note>{unshown} images are not shown: the report keeps about "
        f"{IMAGE_BUDGET / 1e6:g} MB of thumbnails (lower sink.report_rows to see all).</p>"
        if unshown
        else ""
    )
    return f"{heading}{common_html}<section class=sample-grid>{''.join(cells)}</section>{spent}"


def _skipped_html(info: SourceInfo) -> str:
    """The files of an image folder that were not read (hidden, or outside `source.include`)."""
    if not info.skipped_files:
        return ""
    listed = ", ".join(html.escape(path) for path in info.skipped)
    left = info.skipped_files - len(info.skipped)
    more = f" and {left} more" if left else ""
    why = "hidden, or matching no source.include pattern"
    if any(path.rsplit("/", 1)[-1].upper() == "DICOMDIR" for path in info.skipped):
        why = "hidden, matching no source.include pattern, or a DICOMDIR index"
    return f"<p class=skipped>{info.skipped_files} files skipped ({why}): {listed}{more}</p>"


def _thumbnail(data: bytes | dict | None, max_pixels: int | None = None, label: str = "") -> str:
    """An inline WebP <img> of an encoded image, or of a source read as pixels (a DICOM or NIfTI
    source's `{data, shape, dtype}`), at most `THUMBNAIL_SIDE` on a side, or a note when it cannot
    be shown (bombs included)."""
    if not data:
        return "<i>none</i>"
    from PIL import Image

    from operators.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image
    from operators.rows import PIXELS_TYPE, pixel_arrays

    try:
        if isinstance(data, dict):
            image = Image.fromarray(pixel_arrays(pa.array([data], PIXELS_TYPE))[0])
        else:
            image = decode_image(data, max_pixels or DEFAULT_MAX_IMAGE_PIXELS)
        if image.mode not in ("RGB", "L", "RGBA"):
            image = _display_8bit(image)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=1)
    except Exception as error:  # a broken input is shown as such, never fatal to the report
        return f"<i>cannot show: {html.escape(type(error).__name__)}</i>"
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return (
        f'<img src="data:image/webp;base64,{encoded}" width={image.width} height={image.height} '
        f'alt="{html.escape(label, quote=True)}">'
    )


def _display_8bit(image):
    """Scale any mode to 8-bit for display only (the data itself is never changed)."""
    import numpy as np
    from PIL import Image

    if image.mode in ("P", "LA", "PA", "CMYK", "1", "YCbCr"):
        return image.convert("RGB")
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scale = 255.0 / (high - low) if high > low and math.isfinite(high - low) else 0.0
    return Image.fromarray(((array - low) * scale).astype(np.uint8))
