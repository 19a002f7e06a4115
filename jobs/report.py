"""What the driver writes after a job: the row accounting (`summary.json`) and `report.html`."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import Counter

import pyarrow as pa
import pyarrow.dataset

from jobs.config import JobConfig, SinkConfig
from jobs.sources import SourceInfo
from operators.rows import OK, STATUSES
from operators.storage import filesystem_for, join, open_atomically

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256


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


def write_report(config: JobConfig, info: SourceInfo, summary: dict, state) -> str:
    """Write report.html: the first inputs (`sink.report_rows`, in source order) beside their outputs,
    with status and parameters."""
    inputs, keys = _first_inputs(config, info, config.sink.report_rows)
    shown_ids = list(inputs)
    stage_names = [operator.stage_name for operator in config.operators]
    fidelity_columns = ["ssim", "psnr", "histogram_distance"] if config.fidelity is not None else []
    columns = ["id", "variant_index", "status", "error", "seed", "width", "height", "image"]
    table = state.read_fragments(columns + fidelity_columns + stage_names, keys, ids=shown_ids)
    order = {row_id: position for position, row_id in enumerate(shown_ids)}
    rows = sorted(table.to_pylist(), key=lambda row: (order.get(row["id"], len(order)), row["variant_index"]))
    cells = []
    for row in rows:
        output = row["image"]["bytes"] if row["image"] else None
        details = {"seed": row["seed"], "size": f"{row['width']}x{row['height']}" if row["width"] else None}
        details.update({name: row[name] for name in fidelity_columns})
        for name in stage_names:
            if row.get(name):
                details.update({f"{name}.{key}": value for key, value in row[name].items() if "seconds" not in key})
        detail_html = "".join(
            f"<div><b>{html.escape(key)}</b>: {html.escape(str(value))}</div>"
            for key, value in details.items()
            if value is not None
        )
        error = f"<div class=error>{html.escape(row['error'])}</div>" if row["error"] else ""
        cells.append(
            f"<tr class={row['status']}><td>{html.escape(row['id'])}<br>variant {row['variant_index']}"
            f"<br>{row['status']}</td><td>{_thumbnail(inputs.get(row['id']), config.source.max_image_pixels)}</td>"
            f"<td>{_thumbnail(output)}</td><td>{error}{detail_html}</td></tr>"
        )
    filesystem, root = filesystem_for(config.sink.uri, config.sink.storage.storage_options())
    summary_html = " &middot; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in summary.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>restyle report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:6px;vertical-align:top;font-size:13px}}img{{max-width:{THUMBNAIL_SIDE}px}}
tr.error{{background:#fff0f0}}tr.rejected{{background:#fff8e0}}.error{{color:#a00}}</style></head><body>
<h1>restyle report</h1><p>{summary_html}</p>
{_skipped_html(info)}<p>Showing {len(rows)} output rows of the first {len(shown_ids)} inputs.</p>
<table><tr><th>row</th><th>input</th><th>output</th><th>details</th></tr>
{"".join(cells)}
</table></body></html>
"""
    with open_atomically(filesystem, join(root, "report.html")) as handle:
        handle.write(page.encode())
    return join(config.sink.uri, "report.html")


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


def _first_inputs(config: JobConfig, info: SourceInfo, count: int) -> tuple[dict[str, bytes | None], list[str]]:
    """{id: encoded source image} of the first `count` inputs, in source order, read fragment by
    fragment as far as needed, and the keys of those fragments. A refused input (a link out of the
    folder, say) is never read, not even for a thumbnail: it shows as None."""
    from jobs.sources import read_fragment

    source = config.source
    filesystem, root = filesystem_for(source.uri, source.storage.storage_options())
    shown: dict[str, bytes | None] = {}
    keys: list[str] = []
    for index, fragment in enumerate(info.fragments):
        need = count - len(shown)
        if need <= 0:
            break
        keys.append(fragment.key)
        table = read_fragment(source, filesystem, root, index, fragment, {}, first=need)
        ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
        shown.update(zip(ids, images, strict=True))
    return shown, keys


def _thumbnail(data: bytes | dict | None, max_pixels: int | None = None) -> str:
    """An inline <img> of an encoded image, or of a source read as pixels (a DICOM or NIfTI source's
    `{data, shape, dtype}`), or a note when it cannot be shown (bombs included)."""
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
        image.save(buffer, format="PNG")
    except Exception as error:  # a broken input is shown as such, never fatal to the report
        return f"<i>cannot show: {html.escape(type(error).__name__)}</i>"
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


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
