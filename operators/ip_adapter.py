"""IP-Adapter style references for the diffusers operators (img2img, controlnet_img2img, inpaint and
outpaint): an adapter loaded once per actor (`load_ip_adapter`, `set_ip_adapter_scale`) steers each
output towards a reference image, fixed in the config or read per row from a column.

A fixed reference is read and decoded once per actor; a column's is decoded per row on the CPU
prepare step, where one that cannot be decoded becomes that row's error. Each row records its
reference by content hash (sha256 of its encoded bytes), in the stage column and the AUTOMATIC1111
text. diffusers gives one reference image to a whole model call, so rows with different references
go into different calls."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.models import ModelError, ModelReference
from operators.rows import RowError, cell_bytes

logger = logging.getLogger(__name__)

# Digits of the sha256 a reference is recorded by.
REFERENCE_HASH_DIGITS = 12
# The prepared inputs a per-row reference travels as, from the prepare step to the model step.
REFERENCE_IMAGE, REFERENCE_HASH = "ip_adapter_image", "ip_adapter_hash"
# The image encoder's folder beside the adapter's weights, where diffusers' `load_ip_adapter` looks.
IMAGE_ENCODER_FOLDER = "image_encoder"

# Per-row fields of the stage column.
IP_ADAPTER_FIELDS = [
    # The adapter and its scale: 'MODEL/SUBFOLDER/WEIGHT_NAME:SCALE'.
    ("ip_adapter", pa.string()),
    # Where the reference came from ('image:PATH' or 'column:NAME') and its content hash.
    ("ip_adapter_reference", pa.string()),
    ("ip_adapter_image_hash", pa.string()),
]


class IPAdapterConfig(BaseModel):
    """An IP-Adapter and its reference image: exactly one of `image` (the same reference for every
    row) or `column` (a reference per row)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        description="The adapter: a local directory, an s3:// prefix, or a Hub id (owner/name) with `revision`."
    )
    revision: str | None = Field(None, description="Hub commit or tag (required for Hub ids).")
    subfolder: str = Field("", description="Folder of the weights inside `model`, e.g. 'models' for h94/IP-Adapter.")
    weight_name: str = Field(
        description="The adapter's .safetensors file in `subfolder`, e.g. 'ip-adapter_sd15.safetensors'."
    )
    image_encoder: str | None = Field(
        None,
        description="The CLIP vision encoder (a transformers CLIPVisionModelWithProjection directory, s3:// prefix "
        "or Hub id) when it is not in an `image_encoder` folder beside the weights, where diffusers looks.",
    )
    image_encoder_revision: str | None = Field(None, description="Hub revision of `image_encoder`.")
    scale: float = Field(1.0, ge=0, description="How strongly the reference steers the output (0: not at all).")
    image: str | None = Field(None, description="The reference for every row: an image file path or s3:// URI.")
    column: str | None = Field(
        None, description="Column holding each row's reference (encoded bytes or {bytes, path})."
    )

    @model_validator(mode="after")
    def _one_reference(self) -> IPAdapterConfig:
        given = [name for name in ("image", "column") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of image (one reference for every row) or column (a reference per row), "
                f"got {' and '.join(given) or 'neither'}"
            )
        for name in ("subfolder", "weight_name"):
            path = PurePosixPath(getattr(self, name))
            if path.is_absolute() or ".." in path.parts or "\\" in getattr(self, name):
                raise ValueError(f"{name} must be a relative path inside model, got {getattr(self, name)!r}")
        if not self.weight_name.endswith(".safetensors"):
            raise ValueError(f"weight_name must be a .safetensors file, got {self.weight_name!r}")
        return self

    def weight_path(self) -> str:
        """The weights' path inside `model`."""
        return str(PurePosixPath(self.subfolder or ".") / self.weight_name)

    def describe(self) -> str:
        """The adapter and its scale, as the stage column records it."""
        return f"{self.model.rstrip('/')}/{self.weight_path()}:{self.scale:g}"

    def reference_source(self) -> str:
        """Where the reference comes from, as the stage column records it (credentials masked)."""
        from operators.storage import redact

        return f"image:{redact(self.image)}" if self.image is not None else f"column:{self.column}"

    def model_references(self) -> list[ModelReference]:
        """The adapter (with its image encoder beside it, unless `image_encoder` names one) for vetting."""
        references = [
            ModelReference(
                "ip_adapter.model",
                self.model,
                self.revision,
                kind="ip_adapter",
                weight_name=self.weight_path(),
                image_encoder_beside=self.image_encoder is None,
            )
        ]
        if self.image_encoder is not None:
            references.append(
                ModelReference(
                    "ip_adapter.image_encoder", self.image_encoder, self.image_encoder_revision, kind="model"
                )
            )
        if self.image is not None:  # a fixed reference that cannot be read is refused before the job
            references.append(ModelReference("ip_adapter.image", self.image, kind="image"))
        return references

    def input_columns(self) -> set[str]:
        """The reference column, if references come per row."""
        return {self.column} if self.column else set()


def resolve_ip_adapter(
    uri: str,
    revision: str | None,
    weight_path: str,
    image_encoder_beside: bool,
    offline: bool,
    storage_options: dict,
) -> tuple[Path, Path | None]:
    """The local weights file of an adapter (staged from s3:// or the Hub as needed), checked to be an
    IP-Adapter's safetensors file, and its image encoder's vetted folder beside it (None when the
    config names the encoder elsewhere)."""
    from operators.models import check_files, existing_local_path, is_hub_id, stage_files
    from operators.storage import is_remote

    folder = str(PurePosixPath(weight_path).parent)
    encoder_path = str(PurePosixPath(folder) / IMAGE_ENCODER_FOLDER)
    if is_remote(uri):
        root = stage_files(uri, storage_options)
    elif is_hub_id(uri):
        if revision is None:
            raise ModelError(f"IP-Adapter {uri!r} is no local directory, so it is a Hub id; pin it with a revision")
        from huggingface_hub import snapshot_download

        patterns = [weight_path] + (
            [f"{encoder_path}/*.json", f"{encoder_path}/*.safetensors"] if image_encoder_beside else []
        )
        try:
            root = Path(snapshot_download(uri, revision=revision, allow_patterns=patterns, local_files_only=offline))
        except Exception as error:
            from operators.models import one_line

            hint = " (offline mode is on: stage the adapter in the Hub cache first)" if offline else ""
            raise ModelError(f"cannot fetch IP-Adapter {uri}@{revision}: {one_line(error)}{hint}") from None
    else:
        root = existing_local_path("IP-Adapter", uri, "directory")
        if not root.is_dir():
            raise ModelError(f"IP-Adapter {uri!r} is a file; give its directory and weight_name")
    weights = root / weight_path
    if not weights.is_file():
        raise ModelError(f"IP-Adapter {uri} has no {weight_path}; name the weights with subfolder and weight_name")
    check_ip_adapter_weights(weights)
    if not image_encoder_beside:
        return weights, None
    encoder = root / encoder_path
    if not encoder.is_dir():
        raise ModelError(
            f"IP-Adapter {uri} has no {encoder_path}/ folder beside its weights; give ip_adapter.image_encoder"
        )
    check_files(encoder, pipeline=False)
    return weights, encoder


def check_ip_adapter_weights(path: Path) -> None:
    """Refuse a safetensors file that holds no IP-Adapter (`image_proj.*` and `ip_adapter.*` tensors),
    reading only its header."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length < 1 << 28 else None
    except (OSError, ValueError) as error:
        raise ModelError(f"{path} is not a readable safetensors file: {error}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file")
    prefixes = {key.split(".", 1)[0] for key in header if key != "__metadata__"}
    if not {"image_proj", "ip_adapter"} <= prefixes:
        raise ModelError(
            f"{path} holds no IP-Adapter: it needs image_proj.* and ip_adapter.* tensors, got {sorted(prefixes)[:5]}"
        )


def vet_ip_adapter(reference: ModelReference, offline: bool) -> None:
    """Vetting of an adapter on the driver (local, or a Hub id in the cache): see `resolve_ip_adapter`."""
    resolve_ip_adapter(
        reference.uri, reference.revision, reference.weight_name or "", reference.image_encoder_beside, offline, {}
    )


def vet_reference_image(uri: str) -> None:
    """Refuse (ModelError) a fixed local reference image that cannot be read or decoded, on the driver
    before the job starts; one on s3:// is read when the actors load the adapter."""
    from operators.images import DEFAULT_MAX_IMAGE_PIXELS

    data = read_reference(uri, {})
    try:
        decode_reference(data, "cannot be used", DEFAULT_MAX_IMAGE_PIXELS)
    except RowError as problem:
        raise ModelError(str(problem)) from None


def reference_hash(data: bytes) -> str:
    """A reference's content hash: the first digits of the sha256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()[:REFERENCE_HASH_DIGITS]


def decode_reference(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    """A reference's 8-bit RGB pixels; RowError naming `what` when they cannot be decoded. A reference
    of more than 8 bits per sample (16-bit medical slices) is mapped to 8 bits by its own range: the
    image encoder sees only its look, which that keeps."""
    from operators.images import decode_array

    try:
        pixels = decode_array(data, max_pixels)
    except RowError as problem:
        raise RowError(f"{what}: {problem}") from None
    if pixels.dtype != np.uint8:
        low, high = int(pixels.min()), int(pixels.max())
        scaled = (pixels.astype(np.float64) - low) * (255.0 / max(high - low, 1))
        pixels = np.round(scaled).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def prepare_reference(config: IPAdapterConfig | None, row: dict, max_pixels: int) -> dict:
    """The prepared inputs of one row's reference when it comes from a column (none otherwise): its
    pixels and hash. Raises RowError for a null or undecodable reference."""
    if config is None or config.column is None:
        return {}
    value = cell_bytes(row.get(config.column))
    if value is None:
        raise RowError(f"ip_adapter column {config.column!r} is null in this row")
    what = f"ip_adapter reference in column {config.column!r}"
    return {REFERENCE_IMAGE: decode_reference(value, what, max_pixels), REFERENCE_HASH: reference_hash(value)}


@dataclass
class LoadedIPAdapter:
    """An adapter loaded into one actor's pipeline, with the fixed reference (if any) decoded."""

    config: IPAdapterConfig
    image: np.ndarray | None  # the fixed reference's pixels
    image_hash: str | None

    def reference(self, item) -> tuple[np.ndarray, str]:
        """(pixels, hash) of one row's reference."""
        if self.image is not None:
            return self.image, self.image_hash
        return item.input[REFERENCE_IMAGE], item.input[REFERENCE_HASH]

    def call_arguments(self, members: list) -> dict:
        """The model call's reference: diffusers gives one image to every row of a call, so a call holds
        rows of one reference (`key`)."""
        from PIL import Image

        return {"ip_adapter_image": Image.fromarray(self.reference(members[0])[0])}

    def key(self, item) -> str:
        """What must be equal for rows to share a model call."""
        return self.reference(item)[1]

    def record(self, item) -> dict:
        """The stage column's fields (an error row of a per-row reference has no hash)."""
        image_hash = self.image_hash
        if image_hash is None and isinstance(item.input, dict):
            image_hash = item.input.get(REFERENCE_HASH)
        return {
            "ip_adapter": self.config.describe(),
            "ip_adapter_reference": self.config.reference_source(),
            "ip_adapter_image_hash": image_hash,
        }

    def infotext_fields(self, item) -> dict:
        """AUTOMATIC1111 text pairs: the adapter's weights, its weight, and the reference's hash."""
        return {
            "IP-Adapter": PurePosixPath(self.config.weight_name).stem,
            "IP-Adapter weight": self.config.scale,
            "IP-Adapter image hash": self.reference(item)[1],
        }


def ip_adapter_record(loaded: LoadedIPAdapter | None, item) -> dict:
    """The stage column's IP-Adapter fields of one row (null without an adapter)."""
    return loaded.record(item) if loaded is not None else dict.fromkeys(name for name, _ in IP_ADAPTER_FIELDS)


def load_ip_adapter(operator) -> LoadedIPAdapter | None:
    """Load the adapter of a diffusers operator's config into its pipeline (once per actor), with its
    scale and fixed reference; None when the config has none."""
    config: IPAdapterConfig | None = operator.config.ip_adapter
    if config is None:
        return None
    from diffusers.loaders import IPAdapterMixin

    from operators.models import resolve_model

    pipeline = operator.pipeline
    if not isinstance(pipeline, IPAdapterMixin):
        raise ModelError(
            f"ip_adapter: {type(pipeline).__name__} takes no IP-Adapter restyle loads; accepted: SD 1.x/2.x and SDXL "
            "pipelines"
        )
    weights, encoder = resolve_ip_adapter(
        config.model,
        config.revision,
        config.weight_path(),
        config.image_encoder is None,
        operator.offline,
        operator.model_storage_options,
    )
    folder = IMAGE_ENCODER_FOLDER
    if config.image_encoder is not None:
        from transformers import CLIPVisionModelWithProjection

        path = resolve_model(
            config.image_encoder,
            config.image_encoder_revision,
            operator.offline,
            operator.model_storage_options,
            pipeline=False,
        ).path
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(path), dtype=pipeline.dtype, use_safetensors=True, local_files_only=True
        )
        pipeline.register_modules(image_encoder=encoder.to(pipeline.device))
        folder = None  # diffusers keeps a registered encoder
    pipeline.load_ip_adapter(
        str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=folder, local_files_only=True
    )
    pipeline.set_ip_adapter_scale(config.scale)
    # Offload hooks are placed per component: the image encoder added now needs them too.
    if operator.config.cpu_offload == "model":
        pipeline.enable_model_cpu_offload(device=operator.device)
    elif operator.config.cpu_offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=operator.device)
    image = image_hash = None
    if config.image is not None:
        data = read_reference(config.image, operator.model_storage_options)
        try:
            image = decode_reference(data, f"ip_adapter.image {config.image!r}", operator.max_image_pixels)
        except RowError as problem:
            raise ModelError(str(problem)) from None
        image_hash = reference_hash(data)
    logger.info("%s: loaded IP-Adapter %s", operator.stage_label, config.describe())
    return LoadedIPAdapter(config, image, image_hash)


def read_reference(uri: str, storage_options: dict) -> bytes:
    """The bytes of a fixed reference image (a local path or an s3:// URI)."""
    from operators.storage import filesystem_for

    try:
        filesystem, path = filesystem_for(uri, storage_options)
        with filesystem.open(path, "rb") as handle:
            return handle.read()
    except (OSError, ValueError) as error:
        from operators.storage import redact

        raise ModelError(f"ip_adapter.image {redact(uri)!r} cannot be read: {redact(str(error))}") from None
