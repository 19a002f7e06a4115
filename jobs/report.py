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
import pyarrow.compute as pc
import pyarrow.dataset

from jobs.config import JobConfig, SinkConfig
from jobs.sources import SourceInfo, read_arrow_file
from operators.rows import OK, STATUSES
from operators.storage import arrow_filesystem, filesystem_for, join, open_atomically

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256
SKIPPED_LISTED = 50  # skipped files named in report.html; summary.json counts them all


class AccountingError(RuntimeError):
    """Output rows do not match input rows one for one."""


def account_for_rows(config: JobConfig, plan, info: SourceInfo, state, wall_seconds: float) -> dict:
    """Check that every (id, variant) the job owes appears exactly once in the committed shards
    (`state`, a `jobs.commits.SinkState`) and that every committed shard is this config's, and
    count statuses."""
    from jobs.commits import config_hash

    job_hash = config_hash(config)
    foreign = sorted(shard for shard, commit in state.commits.items() if commit.config_hash != job_hash)
    if foreign:
        raise AccountingError(
            f"{len(foreign)} committed shards of sink.uri {config.sink.uri} belong to another config (e.g. "
            f"{foreign[0]}, hash {state.commits[foreign[0]].config_hash}; this config {job_hash})"
        )
    table = state.read(["id", "variant_index", "status"])
    pairs = list(zip(table.column("id").to_pylist(), table.column("variant_index").to_pylist(), strict=True))
    counts = Counter(pairs)
    from jobs.pipeline import variants_per_input

    variants = variants_per_input(config)
    expected = {(row_id, variant) for row_id in info.ids for variant in range(variants)}
    missing = sorted(expected - counts.keys())
    duplicated = sorted(pair for pair, count in counts.items() if count > 1)
    unexpected = sorted(counts.keys() - expected)
    statuses = Counter(table.column("status").to_pylist())
    summary = {
        "source_uri": config.source.uri,
        "sink_uri": config.sink.uri,
        "rows_in": info.row_count,
        "rows_expected": plan.expected_rows,
        "rows_out": table.num_rows,
        **{status: statuses.get(status, 0) for status in STATUSES},
        "skipped": info.skipped_files,
        "missing": len(missing),
        "duplicated": len(duplicated),
        "unexpected": len(unexpected),
        "wall_seconds": round(wall_seconds, 3),
        "images_per_second": round(statuses.get(OK, 0) / wall_seconds, 4) if wall_seconds > 0 else None,
        "seed": config.run.seed,
    }
    if missing or duplicated or unexpected:
        write_summary(config.sink, summary)
        raise AccountingError(
            f"output does not account for every input exactly once: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(duplicated)} duplicated (e.g. {duplicated[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return summary


def write_summary(sink: SinkConfig, summary: dict) -> str:
    """Write summary.json next to the outputs; return its URI."""
    filesystem, root = filesystem_for(sink.uri, sink.storage.storage_options())
    with open_atomically(filesystem, join(root, "summary.json")) as handle:
        handle.write(json.dumps(summary, indent=2).encode())
    return join(sink.uri, "summary.json")


def write_report(config: JobConfig, info: SourceInfo, summary: dict, state) -> str:
    """Write report.html: the first rows' input beside output, with status and parameters."""
    shown_ids = info.ids[: config.sink.report_rows]
    stage_names = [operator.stage_name for operator in config.operators]
    fidelity_columns = ["ssim", "psnr", "histogram_distance"] if config.fidelity is not None else []
    columns = ["id", "variant_index", "status", "error", "seed", "width", "height", "image"]
    table = state.read(columns + fidelity_columns + stage_names, ids=shown_ids)
    inputs = _input_images(config, info, shown_ids)
    rows = sorted(table.to_pylist(), key=lambda row: (row["id"], row["variant_index"]))
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
    if not info.skipped:
        return ""
    listed = ", ".join(html.escape(path) for path in info.skipped[:SKIPPED_LISTED])
    more = f" and {len(info.skipped) - SKIPPED_LISTED} more" if len(info.skipped) > SKIPPED_LISTED else ""
    return (
        f"<p class=skipped>{len(info.skipped)} files skipped (hidden, or matching no source.include pattern): "
        f"{listed}{more}</p>"
    )


def _input_images(config: JobConfig, info: SourceInfo, ids: list[str]) -> dict[str, bytes | None]:
    """Encoded source images of the given ids, read selectively."""
    source = config.source
    filesystem, root = filesystem_for(source.uri, source.storage.storage_options())
    wanted = set(ids)
    if source.format == "images":
        # A refused input (a link out of the folder, say) is never read, not even for a thumbnail.
        by_id = {
            row_id: path
            for row_id, path in zip(info.ids, info.files, strict=True)
            if row_id in wanted and row_id not in info.refused
        }
        return {row_id: filesystem.cat_file(path) for row_id, path in by_id.items()}
    id_field = pc.field(source.id_column).cast(pa.string())
    if source.format == "arrow":
        tables = [
            read_arrow_file(filesystem, path).select([source.id_column, source.image_column]) for path in info.files
        ]
        table = pa.concat_tables(tables).filter(id_field.isin(ids))
    else:
        dataset = pyarrow.dataset.dataset(root, filesystem=arrow_filesystem(filesystem), format="parquet")
        table = dataset.to_table(columns=[source.id_column, source.image_column], filter=id_field.isin(ids))
    images = table.column(source.image_column)
    if pa.types.is_struct(images.type):
        images = pc.struct_field(images, "bytes")
    return {str(row_id): data for row_id, data in zip(table.column(0).to_pylist(), images.to_pylist(), strict=True)}


def _thumbnail(data: bytes | None, max_pixels: int | None = None) -> str:
    """An inline <img> of an encoded image, or a note when it cannot be shown (bombs included)."""
    if not data:
        return "<i>none</i>"
    from operators.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image

    try:
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
