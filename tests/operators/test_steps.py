"""The callables Ray runs for an operator's steps, called directly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from operators.rows import pixel_arrays, to_pixels
from operators.steps import by_prepared_shape


def prepared(shapes: list[tuple | None], dtype=np.uint8) -> pa.Table:
    images = [np.zeros(shape, dtype) if shape is not None else None for shape in shapes]
    return pa.table({"id": [f"r{index}" for index in range(len(shapes))], "image": to_pixels(images)})


def test_rows_of_one_prepared_size_go_next_to_each_other_in_first_seen_order():
    batch = prepared([(16, 24, 3), (8, 8, 3), None, (16, 24, 3), (8, 8), (8, 8, 3), (16, 24, 3)])
    out = by_prepared_shape(batch)
    assert out.column("id").to_pylist() == ["r0", "r3", "r6", "r1", "r5", "r2", "r4"]
    assert [image.shape if image is not None else None for image in pixel_arrays(out.column("image"))] == [
        (16, 24, 3),
        (16, 24, 3),
        (16, 24, 3),
        (8, 8, 3),
        (8, 8, 3),
        None,
        (8, 8),
    ]


def test_a_batch_of_one_size_is_handed_on_as_it_is():
    batch = prepared([(8, 8, 3)] * 3)
    assert by_prepared_shape(batch) is batch


def test_the_same_shape_in_another_dtype_is_another_size():
    eight = prepared([(4, 4, 3)])
    sixteen = prepared([(4, 4, 3)], np.uint16)
    batch = pa.concat_tables([eight, sixteen, eight])
    assert by_prepared_shape(batch).column("image").to_pylist() == [
        *eight.column("image").to_pylist() * 2,
        *sixteen.column("image").to_pylist(),
    ]
