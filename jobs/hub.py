"""The sink as a Hugging Face dataset: its card (`README.md`) and `restyle push`.

The card's YAML front matter names the committed shards as the `default` config's `train` split
(`data/*.parquet`) and lists their features as a card holds them (`jobs.schema.yaml_features`), read
from the shards' own `huggingface` metadata: `datasets.load_dataset(SINK)` then reads the Parquet
shards with their `Image` and passthrough features (without the card it guesses the loader from the
files it sees, and with `images/` it picks `imagefolder`), and the folder is a Hub dataset as it is.
Its body summarises the run (rows, statuses, operators, config hash) and shows the job's config with
every credential masked. License, tags and the like are the user's to add: keys added to the front
matter of restyle's card are kept when a later run rewrites it; a `README.md` restyle did not write
(it lacks `CARD_MARKER`) is never replaced.

The driver writes the card at the end of each run, after `_manifest.json`. `push` uploads what makes
the dataset (`README.md`, the shards under `data/`, the image files and `metadata.jsonl` under
`images/`) with `huggingface_hub`, and deletes the repository's earlier shards and images that the
sink no longer holds; commit records, the lease, the manifest, summary and report stay behind.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pyarrow.parquet as pq
import yaml

from jobs.config import JobConfig
from jobs.schema import yaml_features
from operators.base import UserError
from operators.storage import filesystem_for, is_local, join, open_atomically, redact

logger = logging.getLogger(__name__)

CARD = "README.md"
CARD_MARKER = "<!-- restyle dataset card: rewritten at the end of every run; front-matter keys you add are kept -->"
DATA_FILES = "data/*.parquet"
# Front-matter keys restyle writes; every other key of its card is the user's.
CARD_KEYS = ("configs", "dataset_info")
# What `push` uploads (besides the card) and mirrors: files under these patterns not in the sink are deleted.
PUSHED = (DATA_FILES, "images/*.png", "images/*.webp", "images/*.jpg", "images/metadata.jsonl")
_SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|account_key|access_key|api_key|connection_string")
_FRONT_MATTER = re.compile(r"\A---\n(.*?\n)---\n", re.DOTALL)


class HubError(UserError):
    """A sink that cannot be pushed, or a push the Hub refused."""


def write_card(config: JobConfig, summary: dict, state) -> str | None:
    """Write the sink's `README.md` (see module docstring) from the run's summary and the committed
    shards of `state` (a `jobs.commits.SinkState`); return its path, or None when a README.md that
    restyle did not write is in the way (it is kept)."""
    filesystem, root = state.filesystem, state.root
    path = join(root, CARD)
    kept: dict = {}
    if filesystem.exists(path):
        text = filesystem.cat_file(path).decode("utf-8", "replace")
        if CARD_MARKER not in text:
            logger.warning("sink: %s was not written by restyle; it is kept and no dataset card is written", CARD)
            return None
        kept = {key: value for key, value in front_matter(text).items() if key not in CARD_KEYS}
    features = None
    if state.shards:
        with filesystem.open(state.shards[0], "rb") as handle:
            metadata = pq.read_schema(handle).metadata or {}
        if b"huggingface" in metadata:
            features = json.loads(metadata[b"huggingface"])["info"]["features"]
    with open_atomically(filesystem, path) as handle:
        handle.write(dataset_card(config, summary, features, kept).encode())
    return path


def dataset_card(config: JobConfig, summary: dict, features: dict | None, kept: dict | None = None) -> str:
    """The card's text: front matter (`kept` keys first, then `configs` and `dataset_info`) and body."""
    matter = dict(kept or {})
    matter["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}]
    if features is not None:
        matter["dataset_info"] = {"features": yaml_features(features)}
    head = yaml.safe_dump(matter, sort_keys=False, allow_unicode=True)
    statuses = ", ".join(f"{summary.get(status, 0)} {status}" for status in ("ok", "error", "rejected"))
    facts = [
        ("source", f"`{redact(config.source.uri)}` ({config.source.format})"),
        ("input rows", summary.get("rows_in")),
        ("output rows", f"{summary.get('rows_out')} ({statuses})"),
        ("config hash", f"`{summary.get('config_hash')}`"),
        ("wall time", f"{summary.get('wall_seconds')} s (this run)"),
    ]
    stages = [
        f"{index + 1}. `{operator.stage_name}` ({operator.kind}), {operator.variant_count()} variant(s) per row"
        for index, operator in enumerate(config.operators)
    ]
    lines = [
        "# restyle output",
        "",
        CARD_MARKER,
        "",
        "Images made by a restyle job: one row per output, with the source row's id and columns, its `status` "
        "(`ok`, `error` or `rejected`) and `error`, `variant_index`, and what each stage did.",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'rows = load_dataset("PATH_OR_REPO", split="train")',
        "```",
        "",
        "## Run",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in facts),
        "",
        "## Stages",
        "",
        *stages,
        "",
        "## Job config",
        "",
        "Credentials are masked.",
        "",
        "```yaml",
        shown_config(config).rstrip("\n"),
        "```",
        "",
    ]
    return f"---\n{head}---\n" + "\n".join(lines)


def shown_config(config: JobConfig) -> str:
    """The job's config as YAML, every credential masked: secret fields (`SecretStr`, and any field
    whose name says it holds a secret) and `USER:SECRET@` in URLs."""
    return redact(yaml.safe_dump(_masked(config.model_dump(mode="json", exclude_none=True)), sort_keys=False))


def _masked(value, key: str = ""):
    if isinstance(value, dict):
        return {name: _masked(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [_masked(item, key) for item in value]
    if value is not None and not isinstance(value, bool) and _SECRET_KEY.search(key.lower()):
        return "**********"
    return value


def front_matter(text: str) -> dict:
    """A card's YAML front matter, or {} when it has none or it does not parse."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def is_restyle_card(filesystem, path: str) -> bool:
    """Whether the file at `path` is a dataset card restyle wrote."""
    try:
        return CARD_MARKER.encode() in filesystem.cat_file(path)
    except (OSError, ValueError):
        return False


def push(sink_uri: str, repo_id: str, private: bool = False, token_env: str | None = None) -> tuple[str, list[str]]:
    """Upload a finished local sink to the Hub dataset repository `repo_id` (created if absent,
    `private` then): the card, the shards and the image files, in one upload that also deletes the
    repository's shards and images the sink no longer holds. The token is the one in the variable
    `token_env`, else `huggingface_hub`'s own (HF_TOKEN, or a stored login). Returns the repository's
    URL and the paths uploaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from jobs.commits import MANIFEST
    from jobs.lease import LEASE

    token = None
    if token_env is not None:
        token = os.environ.get(token_env, "")
        if not token:
            raise HubError(f"--token-env {token_env}: the variable is not set or is empty; set it to a Hub token")
    filesystem, root = filesystem_for(sink_uri, {})
    if not is_local(filesystem):
        raise HubError(f"restyle push reads a local sink; {redact(sink_uri)} is not one: copy it here first")
    for name, problem in (
        (LEASE, "a run is writing it; push once it has finished"),
        (MANIFEST, "it has no _manifest.json: its job has not finished; run it to the end first"),
        (CARD, "it has no README.md dataset card: run the job again (it resumes and writes the card)"),
    ):
        if filesystem.exists(join(root, name)) == (name == LEASE):
            raise HubError(f"cannot push sink {sink_uri}: {problem}")
    manifest = json.loads(filesystem.cat_file(join(root, MANIFEST)))
    listed = {entry["shard"] for entry in manifest["shards"]}
    present = {f"data/{path.rsplit('/', 1)[-1]}" for path in filesystem.glob(join(root, DATA_FILES))}
    if present != listed:
        odd = sorted(present ^ listed)
        raise HubError(
            f"cannot push sink {sink_uri}: data/ does not match _manifest.json ({len(odd)} shards differ, e.g. "
            f"{odd[0]}); run the job again to finish it"
        )
    if not is_restyle_card(filesystem, join(root, CARD)):
        raise HubError(f"cannot push sink {sink_uri}: its README.md is not restyle's dataset card")
    patterns = [CARD, *PUSHED]
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=root,
            allow_patterns=patterns,
            ignore_patterns=[".*", "*/.*"],  # temporary files of an atomic write
            delete_patterns=list(PUSHED),
            commit_message=f"restyle output (config {manifest.get('config_hash')}, {manifest.get('rows')} rows)",
        )
    except (HfHubHTTPError, OfflineModeIsEnabled, ValueError) as error:  # refused, offline, or a malformed id
        lines = str(error).strip().splitlines()
        raise HubError(f"cannot push to {repo_id}: {redact(lines[0] if lines else type(error).__name__)}") from None
    images = [path for pattern in PUSHED[1:] for path in filesystem.glob(join(root, pattern))]
    uploaded = sorted([CARD, *listed, *(f"images/{path.rsplit('/', 1)[-1]}" for path in images)])
    return str(url), uploaded
