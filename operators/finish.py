"""The finish step: after the last stage, each output is checked for fidelity (when the job asks)
and encoded once, in the sink's format, carrying its parameters text. Runs as a CPU task."""

from __future__ import annotations

import time

import pyarrow as pa

from operators.base import replace_columns
from operators.rows import ERROR, PARAMETERS, RowError, is_pixels, pixel_arrays


def finish_batch(
    batch: pa.Table,
    stage_name: str,
    encoding=None,
    fidelity=None,
    histogram_stages: list[str] | None = None,
    max_image_pixels: int | None = None,
) -> pa.Table:
    """Encode the `image` pixels of ok and rejected rows as `encoding` says (`EncodingConfig`, the
    default PNG when None) into bytes, record the encoder and the time on the last stage's column
    (`stage_name`), and, with a `fidelity` config, add the fidelity columns first (see
    `operators.fidelity`). A row whose output cannot be encoded becomes an error row."""
    from operators.fidelity import fidelity_batch
    from operators.images import DEFAULT_MAX_IMAGE_PIXELS, EncodingConfig, encode_output

    encoding = encoding or EncodingConfig()
    column = batch.column("image")
    if not is_pixels(column.type):  # nothing to finish (a table already encoded)
        return batch
    arrays = pixel_arrays(column)
    if fidelity is not None:
        batch = fidelity_batch(
            batch, fidelity, histogram_stages or [], max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS, outputs=arrays
        )
    statuses = batch.column("status").to_pylist()
    errors = batch.column("error").to_pylist()
    texts = batch.column(PARAMETERS).to_pylist() if PARAMETERS in batch.column_names else [None] * batch.num_rows
    records = batch.column(stage_name).to_pylist()
    encoded: list[bytes | None] = []
    for index, array in enumerate(arrays):
        data = None
        if array is not None and statuses[index] != ERROR:
            started = time.perf_counter()
            try:
                data = encode_output(array, encoding, texts[index])
            except RowError as problem:
                statuses[index], errors[index] = ERROR, f"encoding the output as {encoding.format}: {problem}"
            records[index] = {
                **records[index],
                "finish_seconds": time.perf_counter() - started,
                "encoding": encoding.describe(array),
            }
        encoded.append(data)
    kept = [status != ERROR for status in statuses]
    columns = {
        "status": pa.array(statuses, pa.string()),
        "error": pa.array(errors, pa.string()),
        "image": pa.array(encoded, pa.binary()),
        **{name: _where(kept, batch.column(name).to_pylist()) for name in ("width", "height")},
        stage_name: pa.array(records, batch.schema.field(stage_name).type),
    }
    table = replace_columns(batch, columns)
    return table.drop_columns([PARAMETERS]) if PARAMETERS in table.column_names else table


def _where(kept: list[bool], values: list) -> pa.Array:
    """Sizes of the rows kept, null for the rows that became errors."""
    return pa.array([value if keep else None for value, keep in zip(values, kept, strict=True)], pa.int32())
