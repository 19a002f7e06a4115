"""The operator contract: prepare (CPU, no model) -> model (arrays in, arrays out) -> finish (encode
once), pixels between steps and stages, the registry, the import layers."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from operators import OPERATOR_CLASSES, OPERATORS
from operators.finish import finish_batch
from operators.images import EncodingConfig, read_parameters
from operators.img2img import Img2Img, Img2ImgConfig
from operators.rows import PARAMETERS, PIXELS_TYPE, PREPARE_SECONDS, pixel_arrays, to_pixels
from operators.standardize import Standardize, StandardizeConfig
from operators.upscale import Upscale, UpscaleConfig
from tests.conftest import make_batch, png_bytes

REPOSITORY = Path(__file__).resolve().parents[2]


def img2img_config(model, **overrides) -> Img2ImgConfig:
    fields = {"kind": "img2img", "model": str(model), "prompt": "a watercolor", "num_inference_steps": 2}
    return Img2ImgConfig(**{**fields, **overrides})


def test_pixels_hold_any_mix_of_sizes_depths_and_channels_and_nulls():
    arrays = [
        np.arange(12, dtype=np.uint8).reshape(2, 2, 3),
        None,
        np.arange(6, dtype=np.uint16).reshape(2, 3) * 10000,
        np.zeros((1, 5, 3), np.uint16),
    ]
    column = to_pixels(arrays)
    assert column.type == PIXELS_TYPE and column.null_count == 1
    back = pixel_arrays(column)
    assert back[1] is None
    for original, restored in zip([arrays[0], arrays[2], arrays[3]], [back[0], back[2], back[3]], strict=True):
        assert restored.dtype == original.dtype and np.array_equal(restored, original)
    # Two batches of different shapes concatenate, as Ray Data does with blocks.
    assert pa.concat_arrays([column, to_pixels([np.ones((7, 7, 3), np.uint8)])]).type == PIXELS_TYPE
    with pytest.raises(ValueError, match="uint8 or uint16"):
        to_pixels([np.zeros((2, 2), np.float32)])


def test_prepare_step_needs_no_model_and_hands_over_arrays(sd_model):
    operator = Img2Img(img2img_config(sd_model, size={"max_side": 32}), load=False)
    assert not hasattr(operator, "pipeline")  # nothing loaded: it runs on a CPU worker
    batch = make_batch([png_bytes(64, 48), b"not an image"])
    prepared = operator.prepare_batch(batch)
    assert prepared.schema.field("image").type == PIXELS_TYPE
    first = pixel_arrays(prepared.column("image"))[0]
    assert first.shape == (24, 32, 3) and first.dtype == np.uint8
    assert prepared.column("status").to_pylist() == ["ok", "error"]
    assert "cannot decode image" in prepared.column("error")[1].as_py()
    assert prepared.column("image")[1].as_py() is None
    assert prepared.column(PREPARE_SECONDS)[0].as_py() > 0


def test_model_step_returns_pixels_and_finish_encodes_once(sd_model):
    batch = make_batch([png_bytes(64, 48)], ids=["cat"])
    operator = Img2Img(img2img_config(sd_model), seed=3)
    modelled = operator.model_batch(Img2Img(img2img_config(sd_model), load=False).prepare_batch(batch))
    assert modelled.schema.field("image").type == PIXELS_TYPE
    assert PREPARE_SECONDS not in modelled.column_names
    assert modelled.column(PARAMETERS)[0].as_py().startswith("a watercolor\n")
    pixels = pixel_arrays(modelled.column("image"))[0]
    finished = finish_batch(modelled, "img2img", EncodingConfig(format="webp"))
    assert PARAMETERS not in finished.column_names
    data = finished.column("image")[0].as_py()
    assert Image.open(io.BytesIO(data)).format == "WEBP"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels)  # lossless by default
    assert read_parameters(data) == modelled.column(PARAMETERS)[0].as_py()
    stage = finished.column("img2img")[0].as_py()
    assert stage["encoding"] == EncodingConfig(format="webp").describe(pixels) and stage["finish_seconds"] > 0
    # The three steps in one process (`__call__`) give the same pixels as the steps apart.
    whole = operator(batch)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(whole.column("image")[0].as_py()))), pixels)


def test_chained_stages_hand_over_pixels_not_files(tmp_path):
    """A 16-bit standardized image goes into a classical upscale as pixels: the result equals what
    upscaling the standardized PNG gives, and nothing is encoded between the stages."""
    sixteen = np.linspace(0, 65535, 48 * 64).astype(np.uint16).reshape(48, 64)
    buffer = io.BytesIO()
    Image.fromarray(sixteen).save(buffer, format="PNG")
    batch = make_batch([buffer.getvalue()])
    standardize = Standardize(StandardizeConfig(kind="standardize", steps=[{"op": "normalize"}], output_dtype="uint16"))
    upscale_config = UpscaleConfig(kind="upscale", method="bicubic", scale=2)
    between = standardize.model_batch(standardize.prepare_batch(batch))
    assert between.schema.field("image").type == PIXELS_TYPE
    chained = Upscale(upscale_config, load=False).prepare_batch(between)
    assert pixel_arrays(chained.column("image"))[0].dtype == np.uint16
    out = finish_batch(Upscale(upscale_config).model_batch(chained), "upscale")
    via_file = Upscale(upscale_config)(finish_batch(between, "standardize").select(["id", "image"]))
    assert out.column("image").to_pylist() == via_file.column("image").to_pylist()
    decoded = np.asarray(Image.open(io.BytesIO(out.column("image")[0].as_py())))
    assert decoded.dtype == np.uint16 and decoded.shape == (96, 128)


def test_registry_is_derived_from_the_operator_classes():
    assert OPERATORS == {operator.config_class: operator for operator in OPERATOR_CLASSES}
    kinds = [config.model_fields["kind"].annotation.__args__[0] for config in OPERATORS]
    assert len(set(kinds)) == len(kinds)
    assert {"controlnet_img2img", "img2img", "inpaint", "outpaint", "standardize", "upscale"} <= set(kinds)
    for config in OPERATORS:  # the contract every config declares, with no probing
        for method in ("variant_count", "input_columns", "model_references", "output_libraries"):
            assert callable(getattr(config, method))


def module_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The project modules a file imports: anywhere in it (also inside functions), or only at module level."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("jobs", "operators")}


def test_layers_operators_never_import_jobs_and_the_bottom_imports_nothing_above():
    for path in sorted((REPOSITORY / "operators").glob("*.py")):
        assert not [name for name in module_imports(path) if name.startswith("jobs")], path.name
    bottom = {"rows": set(), "storage": {"operators.s3"}, "s3": {"operators.base"}}
    for name, allowed in bottom.items():
        assert module_imports(REPOSITORY / "operators" / f"{name}.py") <= allowed, name


def test_no_import_cycles_among_module_level_imports():
    modules = {
        f"{path.parent.name}.{path.stem}": path
        for folder in ("jobs", "operators")
        for path in (REPOSITORY / folder).glob("*.py")
        if path.stem != "__init__"
    }
    graph = {
        name: {m for m in module_imports(path, top_level_only=True) if m in modules} for name, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*trail, name, target])}")
            if target not in state:
                visit(target, [*trail, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_a_prompt_is_encoded_once_per_actor_however_many_rows_repeat_it(sd_model):
    operator = Img2Img(img2img_config(sd_model, model_batch_size=2, negative_prompt="blurry"), seed=1)
    calls = []
    handle = operator.pipeline.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = operator(make_batch([png_bytes(32, 32)] * 4))
        operator(make_batch([png_bytes(32, 32)] * 2, ids=["x", "y"]))
    finally:
        handle.remove()
    assert out.column("status").to_pylist() == ["ok"] * 4
    assert len(calls) == 2  # the prompt and the negative prompt, once each, for 6 rows in 4 calls


def test_out_of_memory_halves_the_model_call_and_is_recorded(sd_model, monkeypatch):
    import torch

    operator = Img2Img(img2img_config(sd_model, model_batch_size=4), seed=1)
    real = operator.pipeline
    sizes = []

    class SmallGpu:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **arguments):
            sizes.append(len(arguments["image"]))
            if len(arguments["image"]) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(**arguments)

    monkeypatch.setattr(operator, "pipeline", SmallGpu())
    out = operator(make_batch([png_bytes(32, 32)] * 4))
    assert out.column("status").to_pylist() == ["ok"] * 4
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert [stage["oom_backoffs"] for stage in out.column("img2img").to_pylist()] == [3, 3, 3, 3]
    # Each row's bytes are those of a one-row call.
    alone = Img2Img(img2img_config(sd_model, model_batch_size=1), seed=1)(make_batch([png_bytes(32, 32)] * 4))
    assert out.column("image").to_pylist() == alone.column("image").to_pylist()
