"""The finish step: after the last stage, each output is checked for fidelity (when the job asks)
and encoded once, in the sink's format, carrying its parameters text. Runs as a CPU task."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from operators.base import replace_columns
from operators.rows import ERROR, PARAMETERS, RowError, is_pixels, pixel_arrays

# The column that carries each output's derived DICOM file from the finish step to the sink.
DICOM_FILE = "_dicom_file"


@dataclass(frozen=True)
class DicomOutput:
    """With `sink.dicom`: what every derived instance of the run shares (see `operators.dicom_out`)."""

    config_hash: str  # the run's UIDs derive from it
    derivation: str  # DerivationDescription: restyle's version and the stages
    attributes: tuple[str, ...] = ()  # the kept attributes' columns (`source.dicom.attributes`)


def finish_batch(
    batch: pa.Table,
    stage_name: str,
    encoding=None,
    fidelity=None,
    histogram_stages: list[str] | None = None,
    max_image_pixels: int | None = None,
    dicom: DicomOutput | None = None,
) -> pa.Table:
    """Encode the `image` pixels of ok and rejected rows as `encoding` says (`EncodingConfig`, the
    default PNG when None) into bytes, record the encoder and the time on the last stage's column
    (`stage_name`), and, with a `fidelity` config, add the fidelity columns first (see
    `operators.fidelity`). With `dicom`, each output is also written as a derived DICOM instance of
    its source (the row's `dicom` record and kept attributes) into `DICOM_FILE`. A row whose output
    cannot be encoded becomes an error row."""
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
    derived = _DerivedInstances(batch, dicom) if dicom is not None else None
    for index, array in enumerate(arrays):
        data = None
        if array is not None and statuses[index] != ERROR:
            started = time.perf_counter()
            try:
                data = encode_output(array, encoding, texts[index])
            except RowError as problem:
                statuses[index], errors[index] = ERROR, f"encoding the output as {encoding.format}: {problem}"
            if derived is not None and statuses[index] != ERROR:
                try:
                    derived.write(index, array)
                except ValueError as problem:  # RowError, or a kept attribute the derived instance refuses
                    statuses[index], errors[index], data = ERROR, f"writing the output as DICOM: {problem}", None
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
    if derived is not None:
        columns[DICOM_FILE] = pa.array(derived.files, pa.binary())
    table = replace_columns(batch, columns)
    return table.drop_columns([PARAMETERS]) if PARAMETERS in table.column_names else table


class _DerivedInstances:
    """Derived DICOM files of one batch's outputs, from each row's `dicom` record, kept attributes and
    variant (`operators.dicom_out.derived_instance`)."""

    def __init__(self, batch: pa.Table, dicom: DicomOutput):
        from operators.dicom import RECORD_COLUMN

        self.dicom = dicom
        self.records = batch.column(RECORD_COLUMN).to_pylist()
        self.variants = batch.column("variant_index").to_pylist()
        kept = [name for name in dicom.attributes if name in batch.column_names]
        values = [batch.column(name).to_pylist() for name in kept]
        self.attributes = [
            {name: column[row] for name, column in zip(kept, values, strict=True)} for row in range(batch.num_rows)
        ]
        self.files: list[bytes | None] = [None] * batch.num_rows

    def write(self, index: int, array) -> None:
        from operators.dicom_out import derived_instance

        record = self.records[index]
        if record is None:
            raise RowError("the row has no DICOM record to derive from")
        self.files[index] = derived_instance(
            array, record, self.attributes[index], self.dicom.config_hash, self.variants[index], self.dicom.derivation
        )


def _where(kept: list[bool], values: list) -> pa.Array:
    """Sizes of the rows kept, null for the rows that became errors."""
    return pa.array([value if keep else None for value, keep in zip(values, kept, strict=True)], pa.int32())
