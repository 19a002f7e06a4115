"""Finding, staging and vetting model checkpoints before any weights are loaded.

A model is named by a local directory, an `s3://` prefix (copied once per node into a local
cache) or a Hugging Face Hub id with a pinned revision. Whatever the origin, the local copy is
checked before loading: only safetensors weights, and no component whose code lives outside
diffusers and transformers, so nothing from a checkpoint is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from operators.base import UserError

logger = logging.getLogger(__name__)

TRUSTED_LIBRARIES = ("diffusers", "transformers")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
HUB_ALLOW_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]


class ModelError(UserError):
    """A model that cannot or must not be loaded."""


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint on local disk plus what identifies it in output metadata."""

    path: Path
    model_id: str
    revision: str


def default_cache_dir() -> Path:
    """Where staged checkpoints live on each node (`RESTYLE_CACHE`, else ~/.cache/restyle)."""
    return Path(os.environ.get("RESTYLE_CACHE", Path.home() / ".cache" / "restyle")) / "models"


def is_hub_id(uri: str) -> bool:
    """A Hub id is `owner/name` with no scheme and no local directory of that name."""
    return "://" not in uri and uri.count("/") == 1 and not Path(uri).exists()


def resolve_model(
    uri: str,
    revision: str | None = None,
    offline: bool = True,
    storage_options: dict | None = None,
    cache_dir: Path | None = None,
    pipeline: bool = True,
) -> ResolvedModel:
    """Make the checkpoint named by `uri` available locally and vet it: a whole pipeline
    (`model_index.json`) or, with `pipeline=False`, a single model (`config.json`, e.g. a ControlNet)."""
    if uri.startswith("s3://"):
        path = stage_files(uri, storage_options or {}, cache_dir)
        resolved = ResolvedModel(path, uri, revision or model_fingerprint(path))
    elif is_hub_id(uri):
        if revision is None:
            raise ModelError(f"model {uri!r} is a Hub id; pin it with a revision (commit sha or tag)")
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(uri, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline)
            )
        except Exception as error:
            hint = " (offline mode is on: stage the model in the Hub cache first)" if offline else ""
            raise ModelError(f"cannot fetch model {uri}@{revision}: {error}{hint}") from None
        resolved = ResolvedModel(path, uri, revision)
    else:
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise ModelError(f"model {uri!r} is neither a local directory, an s3:// prefix nor a Hub id (owner/name)")
        resolved = ResolvedModel(path, uri, revision or model_fingerprint(path))
    if pipeline:
        check_model_files(resolved.path)
    else:
        check_weights_are_safetensors(resolved.path)
    return resolved


def check_model_files(path: Path) -> None:
    """Refuse checkpoints that would need pickle weights or code from outside the trusted libraries."""
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{path} has no model_index.json; it is not a diffusers pipeline directory")
    index = json.loads(index_path.read_text())
    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or not class_name.isidentifier() or not _is_diffusers_pipeline(class_name):
        raise ModelError(
            f"{index_path}: _class_name {class_name!r} is not a diffusers pipeline; custom pipeline code is not loaded"
        )
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        library = spec[0]
        if library not in TRUSTED_LIBRARIES:
            raise ModelError(
                f"{index_path}: component {component!r} names code from {library!r}; only "
                f"{', '.join(TRUSTED_LIBRARIES)} components are loaded (no remote or custom code)"
            )
        if (path / component).is_dir():
            check_weights_are_safetensors(path / component)


def check_weights_are_safetensors(directory: Path) -> None:
    """Refuse a model directory whose weights exist only in pickle formats."""
    if not directory.is_dir():
        raise ModelError(f"{directory} is not a model directory")
    files = [file.name for file in directory.iterdir()]
    has_weights = any(name.endswith(PICKLE_SUFFIXES + (".safetensors",)) for name in files)
    if has_weights and not any(name.endswith(".safetensors") for name in files):
        raise ModelError(
            f"{directory} holds only pickle weights ({', '.join(sorted(files))}); only .safetensors weights are loaded"
        )


def _is_diffusers_pipeline(name: str) -> bool:
    import diffusers

    return name.endswith("Pipeline") and hasattr(diffusers, name)


def model_fingerprint(path: Path) -> str:
    """A content hash of every file in a checkpoint directory, so outputs name what made them."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def stage_files(uri: str, storage_options: dict, cache_dir: Path | None = None) -> Path:
    """Copy an s3:// prefix to the node's cache once; concurrent actors wait on a file lock."""
    from filelock import FileLock

    from jobs.storage import filesystem_for

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
