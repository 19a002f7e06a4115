"""Finding, staging and vetting model checkpoints before any weights are loaded.

A model is named by a local directory, an `s3://` prefix (copied once per node into a local
cache) or a Hugging Face Hub id with a pinned revision. Whatever the origin, the local copy is
checked before loading: only safetensors weights (of the chosen variant, sharded or not; pickle
files beside them are never read), and no component whose code lives outside diffusers (its pipeline
modules included) and transformers, so nothing from a checkpoint is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from operators import catalogue
from operators.base import UserError
from operators.storage import is_remote

logger = logging.getLogger(__name__)

TRUSTED_LIBRARIES = ("diffusers", "transformers")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
HUB_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".safetensors",)
# Repository ids as the Hub spells them: owner/name, word characters, '-' and '.'.
HUB_ID = re.compile(r"\w(?:[\w\-.]*\w)?/\w(?:[\w\-.]*\w)?")
# Shard numbering and shard index names, as diffusers and transformers write them (with or without a variant).
SHARD = re.compile(r"-\d{5}-of-\d{5}")
SHARD_INDEX = re.compile(r"(?P<base>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json")


class ModelError(UserError):
    """A model that cannot or must not be loaded."""


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint on local disk plus what identifies it in output metadata."""

    path: Path
    model_id: str
    revision: str


@dataclass(frozen=True)
class ModelReference:
    """A checkpoint an operator config names: which field, where it lives, and how it is loaded
    ('pipeline': a diffusers pipeline directory, 'model': a single model such as a ControlNet,
    'lora': a LoRA adapter file, 'ip_adapter': an IP-Adapter's weights at `weight_name` inside the
    directory, with its image encoder beside them when `image_encoder_beside`, 'image': a reference
    image the model reads, which must decode). `negative_prompt` and
    `multiple_of` say what the config asks of a pipeline: a negative prompt, and image sides rounded to
    a multiple of this."""

    field: str
    uri: str
    revision: str | None = None
    variant: str | None = None
    kind: Literal["pipeline", "model", "lora", "ip_adapter", "image"] = "pipeline"
    weight_name: str | None = None
    safety_checker: bool | None = None
    negative_prompt: bool = False
    multiple_of: int | None = None
    image_encoder_beside: bool = False


def vet_models(operators: list, offline: bool = True) -> list[str]:
    """Check every model and LoRA the operators name, as far as it can be checked on this machine,
    before anything runs: local paths exist and hold a vetted checkpoint (safetensors only, no custom
    code, the asked variant), LoRA files are .safetensors, Hub ids carry a revision (and, offline,
    are in the Hub cache). Remote prefixes (s3://, gs://, ...) and Hub downloads are checked when the
    actors stage them; here only whether their store's package is installed.
    Returns one line per problem, naming the field."""
    problems = []
    for index, operator in enumerate(operators):
        for reference in operator.model_references():
            try:
                vet_reference(reference, offline)
            except (ModelError, OSError) as error:
                problems.append(f"operators[{index}].{reference.field}: {one_line(error)}")
    return problems


def require_vetted_models(operators: list, offline: bool = True) -> None:
    """`vet_models`, raising one ModelError that lists every problem (before a job starts Ray)."""
    problems = vet_models(operators, offline)
    if problems:
        raise ModelError("; ".join(problems))


# What messages call each kind of reference.
_REFERENCE_NAMES = {"pipeline": "model", "model": "model", "lora": "LoRA", "ip_adapter": "IP-Adapter", "image": "image"}


def vet_reference(reference: ModelReference, offline: bool = True) -> None:
    """Vet one reference without staging or downloading anything; raises ModelError."""
    uri = reference.uri
    if is_remote(uri):  # staged and checked by the actors; here only whether its store can be read
        refuse_unsupported_scheme(_REFERENCE_NAMES[reference.kind], uri)
        return
    if reference.kind == "image":
        from operators.ip_adapter import vet_reference_image

        vet_reference_image(uri)
        return
    if is_hub_id(uri) and reference.revision is not None and not offline:
        return
    if reference.kind == "lora":
        from operators.diffusion import LoraAdapter, resolve_lora

        lora = LoraAdapter(model=uri, weight_name=reference.weight_name, revision=reference.revision)
        resolve_lora(lora, offline, {})
        return
    if reference.kind == "ip_adapter":
        from operators.ip_adapter import vet_ip_adapter

        vet_ip_adapter(reference, offline)
        return
    pipeline = reference.kind == "pipeline"
    if is_hub_id(uri):
        path = resolve_model(uri, reference.revision, offline, pipeline=pipeline, variant=reference.variant).path
    else:
        path = local_model_path(uri)
        check_files(path, pipeline, reference.variant)
    if pipeline:
        ships_safety_checker(path, reference.safety_checker)
        check_pipeline_options(path, reference)


# Pipeline families (`_class_name` prefixes in model_index.json) whose transformer denoises 2x2
# patches of latents (SD3's patch_size, Flux's packing): image sides are multiples of twice the VAE's
# scale factor (16 for their 8x VAEs).
PATCHED_LATENT_FAMILIES = ("StableDiffusion3", "Flux")
# Families that use a negative prompt only under true classifier-free guidance (`true_cfg_scale` > 1,
# default 1), which restyle does not run: FLUX.1 [dev] is guidance-distilled, FLUX.1 [schnell] unguided.
NO_NEGATIVE_PROMPT_FAMILIES = ("Flux",)


def check_pipeline_options(path: Path, reference: ModelReference) -> None:
    """Refuse what a vetted pipeline checkpoint cannot do as the config asks: a negative prompt for a
    family that ignores it, or image sides rounded to a multiple its latents cannot take."""
    if reference.kind != "pipeline" or not (reference.negative_prompt or reference.multiple_of):
        return
    index = read_json(path / "model_index.json")
    class_name = str(index.get("_class_name")) if isinstance(index, dict) else ""
    if reference.negative_prompt and class_name.startswith(NO_NEGATIVE_PROMPT_FAMILIES):
        raise ModelError(
            f"negative_prompt is set, but {reference.uri} is a {class_name}, which uses no negative prompt "
            "(only under true classifier-free guidance, which restyle does not run); remove negative_prompt "
            "and sweep.negative_prompt"
        )
    if reference.multiple_of and class_name.startswith(PATCHED_LATENT_FAMILIES):
        vae = path / "vae" / "config.json"
        config = read_json(vae) if vae.is_file() else {}
        blocks = config.get("block_out_channels") if isinstance(config, dict) else None
        needed = 2 * 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 16
        if reference.multiple_of % needed:
            raise ModelError(
                f"size.multiple_of is {reference.multiple_of}, but {reference.uri} is a {class_name}, whose "
                f"image sides must be multiples of {needed}; set size.multiple_of to {needed}"
            )


def ships_safety_checker(path: Path, wanted: bool | None = None) -> bool:
    """Whether a vetted pipeline checkpoint has a safety checker; `wanted=True` refuses one without."""
    index = read_json(path / "model_index.json")
    spec = index.get("safety_checker") if isinstance(index, dict) else None
    ships = isinstance(spec, list) and bool(spec) and spec[0] is not None
    if wanted and not ships:
        raise ModelError(f"safety_checker is true, but checkpoint {path} has no safety checker")
    return ships


def quiet_loading_bars() -> None:
    """Turn off the loading bars of diffusers and transformers in this process: a model loads once per
    actor or worker, and its bars would only interleave with the job's own lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def default_cache_dir() -> Path:
    """Where staged checkpoints live on each node (`RESTYLE_CACHE`, else ~/.cache/restyle)."""
    return Path(os.environ.get("RESTYLE_CACHE", Path.home() / ".cache" / "restyle")) / "models"


def is_hub_id(uri: str) -> bool:
    """A Hub id is `owner/name` (as the Hub spells repository ids) with no local path of that name."""
    return (
        HUB_ID.fullmatch(uri) is not None
        and ".." not in uri
        and "--" not in uri
        and len(uri) <= 96
        and not Path(uri).exists()
    )


def resolve_model(
    uri: str,
    revision: str | None = None,
    offline: bool = True,
    storage_options: dict | None = None,
    cache_dir: Path | None = None,
    pipeline: bool = True,
    variant: str | None = None,
) -> ResolvedModel:
    """Make the checkpoint named by `uri` available locally and vet it: a whole pipeline
    (`model_index.json`) or, with `pipeline=False`, a single model (`config.json`, e.g. a ControlNet).
    `variant` (e.g. "fp16") names the weight files that will be loaded."""
    if is_remote(uri):
        path = stage_files(uri, storage_options or {}, cache_dir)
        resolved = ResolvedModel(path, uri, revision or model_fingerprint(path))
    elif is_hub_id(uri):
        if revision is None:
            raise ModelError(
                f"model {uri!r} is no local directory, so it is a Hub id; pin it with a revision (commit sha or tag)"
            )
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(uri, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline)
            )
        except Exception as error:
            hint = " (offline mode is on: stage the model in the Hub cache first)" if offline else ""
            raise ModelError(f"cannot fetch model {uri}@{revision}: {one_line(error)}{hint}") from None
        resolved = ResolvedModel(path, uri, revision)
    else:
        path = local_model_path(uri)
        check_files(path, pipeline, variant)
        return ResolvedModel(path, uri, revision or model_fingerprint(path))
    check_files(resolved.path, pipeline, variant)
    return resolved


def local_model_path(uri: str) -> Path:
    """The local checkpoint directory `uri` names, or a ModelError saying why there is none."""
    path = existing_local_path("model", uri, "directory")
    if not path.is_dir():
        raise ModelError(f"model {uri!r} is a file; give the checkpoint's directory (diffusers layout)")
    return path


def existing_local_path(what: str, uri: str, kind: str) -> Path:
    """The local path `uri` names (`~` expanded), or a ModelError naming the unsupported scheme or the
    missing `kind` ("directory", "file or directory")."""
    refuse_unsupported_scheme(what, uri)
    path = Path(uri).expanduser()
    if not path.exists():
        raise ModelError(
            f"{what} {uri!r} does not exist: no local {kind} {path.absolute()}, and it is neither an s3:// "
            "prefix nor a Hub id (owner/name)"
        )
    return path


def refuse_unsupported_scheme(what: str, uri: str) -> None:
    """A ModelError for a URI whose scheme restyle does not read (anything but file:// and the remote
    stores of `operators.storage`), or whose store needs a package that is not installed."""
    from operators.storage import REMOTE_SCHEMES, missing_library

    scheme = uri.split("://", 1)[0] if "://" in uri else None
    if scheme is not None and scheme != "file" and scheme not in REMOTE_SCHEMES:
        raise ModelError(
            f"{what} {re.sub(r'(?<=://)[^/@]*@', '***@', uri)!r}: unsupported URI scheme {scheme!r}; accepted: a "
            "local directory, s3://, gs://, az://, hf:// or memory:// prefix, or a Hub id (owner/name)"
        )
    problem = missing_library(uri) if scheme is not None else None
    if problem:
        raise ModelError(f"{what} {re.sub(r'(?<=://)[^/@]*@', '***@', uri)!r}: {problem}")


def check_files(path: Path, pipeline: bool = True, variant: str | None = None) -> None:
    """Vet a local checkpoint: a pipeline directory, or (`pipeline=False`) a single model's."""
    if pipeline:
        check_model_files(path, variant)
        return
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; it is not a diffusers model directory")
    check_weights_are_safetensors(path, variant, required=True)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def read_json(path: Path) -> object:
    """A checkpoint's JSON file, or a ModelError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"{path} is not valid JSON: {one_line(error)}") from None


def check_model_files(path: Path, variant: str | None = None) -> None:
    """Refuse checkpoints that would need pickle weights or code from outside diffusers (its pipeline
    modules included) and transformers."""
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{path} has no model_index.json; it is not a diffusers pipeline directory")
    index = read_json(index_path)
    if not isinstance(index, dict):
        raise ModelError(f"{index_path} must hold a JSON object, got {type(index).__name__}")
    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or not class_name.isidentifier() or not catalogue.is_pipeline(class_name):
        raise ModelError(
            f"{index_path}: _class_name {class_name!r} is not a diffusers pipeline; custom pipeline code is not loaded"
        )
    expected = catalogue.pipeline_components(class_name)
    if expected is None:
        raise ModelError(
            f"{index_path}: _class_name {class_name!r} is a diffusers pipeline without a constructor of its "
            "own (a base or modular pipeline); accepted: the pipelines diffusers' AutoPipeline classes load"
        )
    components = set(expected) | {
        key for key, value in index.items() if isinstance(value, list) and not key.startswith("_")
    }
    found_variant = variant is None
    for component in sorted(components & set(index)):
        spec = index[component]
        if (
            not isinstance(spec, list)
            or len(spec) != 2
            or not all(part is None or isinstance(part, str) for part in spec)
        ):
            raise ModelError(
                f"{index_path}: component {component!r} must be [library, class] (or [null, null]), got {spec!r}"
            )
        library, component_class = spec
        if library is None or component_class is None:
            continue
        if library not in TRUSTED_LIBRARIES and not catalogue.is_pipeline_module_class(library, component_class):
            raise ModelError(
                f"{index_path}: component {component!r} names code from {library!r}; only "
                f"{', '.join(TRUSTED_LIBRARIES)} components and diffusers pipeline modules are loaded "
                "(no remote or custom code)"
            )
        if (path / component).is_dir():
            found_variant |= check_weights_are_safetensors(path / component, variant)
    if not found_variant:
        raise ModelError(f"{path} has no weight files of variant {variant!r} (such as unet/*.{variant}.safetensors)")


def weight_variant(name: str) -> str | None:
    """The variant of a weight file name: 'fp16' for `model.fp16.safetensors`,
    `diffusion_pytorch_model.fp16-00001-of-00002.safetensors` or the older
    `diffusion_pytorch_model-00001-of-00002.fp16.safetensors`; None for plain names."""
    stem = SHARD.sub("", name.rsplit(".", 1)[0])
    parts = stem.split(".")
    return parts[-1] if len(parts) > 1 else None


def check_weights_are_safetensors(directory: Path, variant: str | None = None, required: bool = False) -> bool:
    """Refuse a model directory whose weights (of `variant`, if it has files of that variant, else the
    plain ones) exist only in pickle formats, or whose shard index is broken. Pickle files beside
    safetensors ones are ignored: loading passes `use_safetensors=True`. Returns whether files of
    `variant` were found; with `required`, their absence is an error."""
    if not directory.is_dir():
        raise ModelError(f"{directory} is not a model directory")
    names = sorted(file.name for file in directory.iterdir() if file.is_file())
    weights = [name for name in names if name.endswith(WEIGHT_SUFFIXES)]
    has_variant = variant is not None and any(weight_variant(name) == variant for name in weights)
    if variant is not None and required and not has_variant:
        raise ModelError(
            f"{directory} has no weight files of variant {variant!r}; it holds {', '.join(weights) or 'no weights'}"
        )
    chosen = [name for name in weights if weight_variant(name) == (variant if has_variant else None)]
    if weights and not chosen:
        variants = sorted({str(weight_variant(name)) for name in weights})
        raise ModelError(
            f"{directory} has only variant weights ({', '.join(weights)}); set variant to one of {variants}"
        )
    if chosen and not any(name.endswith(".safetensors") for name in chosen):
        label = f"{variant} " if has_variant else ""
        raise ModelError(
            f"{directory} holds only pickle {label}weights ({', '.join(chosen)}); only .safetensors weights are loaded"
        )
    for name in names:
        if SHARD_INDEX.fullmatch(name):
            _check_shard_index(directory / name, set(names))
    return has_variant


def _check_shard_index(index_path: Path, files: set[str]) -> None:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index_path} must hold a JSON object with a non-empty weight_map")
    for shard in sorted(set(map(str, weight_map.values()))):
        if not shard.endswith(".safetensors") or "/" in shard or "\\" in shard:
            raise ModelError(f"{index_path} names shard {shard!r}; shards must be .safetensors files beside it")
        if shard not in files:
            raise ModelError(f"{index_path} names shard {shard!r}, which is missing")


def model_fingerprint(path: Path, cache_dir: Path | None = None) -> str:
    """A content hash of every file in a checkpoint directory, so outputs name what made them.

    Hashing a real checkpoint reads gigabytes (an SD 1.5 snapshot with its `.bin` and fp16 files is
    over 10 GB) on every actor start, so the result is kept on the node (`cache_dir`, the staging
    cache by default) with each file's name, size and modification time, and reused while they all
    match, as make and git trust a file's stat. Actors starting together on one node hash once (a
    file lock). Where the cache cannot be written, the checkpoint is hashed each time."""
    from filelock import FileLock

    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [[file.relative_to(path).as_posix(), *_stat_key(file)] for file in files]
    cache_dir = cache_dir or default_cache_dir()
    entry = cache_dir / "fingerprints" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".json")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry) + ".lock")
        lock.acquire()
    except OSError as error:
        logger.debug("cannot keep the fingerprint of %s in %s: %s", path, entry.parent, error)
        return _hash_files(path, files)
    try:
        try:
            cached = json.loads(entry.read_text())
            if cached["files"] == listing:
                return cached["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: hash again
        fingerprint = _hash_files(path, files)
        try:
            # Written in place: every reader holds the lock too, and an entry a crash left torn reads
            # as unreadable above, so it is hashed again.
            entry.write_text(json.dumps({"path": str(path), "files": listing, "fingerprint": fingerprint}))
        except OSError as error:
            logger.debug("cannot keep the fingerprint of %s in %s: %s", path, entry, error)
        return fingerprint
    finally:
        lock.release()


def _stat_key(file: Path) -> list[int]:
    """What tells a file changed without reading it: size and modification time in nanoseconds."""
    status = file.stat()
    return [status.st_size, status.st_mtime_ns]


def _hash_files(path: Path, files: list[Path]) -> str:
    """sha256 over each file's relative name and content, in name order (`model_fingerprint`)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def stage_files(uri: str, storage_options: dict, cache_dir: Path | None = None) -> Path:
    """Copy a remote prefix (s3://, gs://, az://, hf://, ...) to the node's cache once; concurrent
    actors wait on a file lock."""
    from filelock import FileLock

    from operators.storage import filesystem_for

    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        filesystem, root = filesystem_for(uri, storage_options)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".staging-"))
        try:
            for remote in filesystem.find(root):
                relative = remote[len(root.rstrip("/")) + 1 :]
                local = staging / relative
                local.parent.mkdir(parents=True, exist_ok=True)
                filesystem.get_file(remote, str(local))
            if not any(staging.iterdir()):
                raise ModelError(f"model prefix {uri} is empty or does not exist")
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("staged model %s into %s", uri, target)
    return target
