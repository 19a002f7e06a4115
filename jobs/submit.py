"""`restyle submit`: run a job on a Ray cluster through Ray's job submission API.

The config is validated here first, so a bad one fails before the cluster is contacted. The job
then ships as a small working directory (this project's `jobs/`, `operators/`, `configs/` and
`pyproject.toml`, plus the validated config as `job.yaml`) and runs `python -m jobs.cli run
job.yaml` on the cluster, exactly as `restyle run` runs locally. The cluster's Python must have
restyle's dependencies installed; local paths in the config are resolved on the cluster, relative
to that working directory.

Credentials are never shipped. Ray keeps a job's working directory in the cluster's storage (GCS)
where any user of the cluster can fetch it, and shows a job's runtime environment in the dashboard
and `ray job` commands, so a config holding inline secrets (`access_key_id`, `secret_access_key`,
`session_token` in any `storage` section) is refused, and nothing goes into the runtime
environment's `env_vars`. On a cluster, object storage is reached with the pod's or node's
identity, or with `AWS_*` variables set on the cluster's nodes.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import BaseModel, SecretStr

from jobs.config import ConfigError, JobConfig, load_config, validate_config

EXIT_CONFIG = 2
EXIT_FAILED = 1

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages) holding jobs/
SHIPPED_PACKAGES = ("jobs", "operators")  # the job cannot run without them
SHIPPED_EXTRAS = ("configs", "pyproject.toml")  # shipped when present (absent from an installed wheel)
JOB_CONFIG_NAME = "job.yaml"
ENTRYPOINT = ("python", "-m", "jobs.cli", "run", JOB_CONFIG_NAME)
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
STATUS_POLL_SECONDS = 1.0


class SubmitError(RuntimeError):
    """A job that cannot be submitted: the message says why and what to do instead."""


def submit(
    config_path: str | Path,
    address: str,
    overrides: list[str] | tuple[str, ...] = (),
    wait: bool = False,
    out: TextIO | None = None,
    output_options: list[str] | tuple[str, ...] = (),
) -> int:
    """Validate a job config, submit it to the Ray job server at `address` (the dashboard's
    http://HEAD:8265) and print the submission id.

    The job's `restyle run` gets `output_options` (-q, --verbose, --log-level as `restyle submit` was
    given them), so its log says as much as the user asked for. With `wait`, stream the job's logs to
    `out` (default: stdout) until it ends and print its final status.
    Returns 0 once submitted (with `wait`: once the job SUCCEEDED), 1 when a waited-for job
    FAILED or was STOPPED, and 2 when nothing was submitted: a bad config, inline credentials
    (see the module docstring), or a job server that is unreachable or refuses the request (a
    cluster with token authentication needs `RAY_AUTH_MODE=token` and its token, as `ray job` does).
    Errors go to stderr as `error: ...`, in the same format as `restyle run`.
    """
    out = out or sys.stdout
    try:
        config = load_config(config_path, list(overrides))
        refuse_inline_secrets(config, config_path)
    except (ConfigError, SubmitError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    submission_id = make_submission_id(config_path)
    try:
        client = JobSubmissionClient(address)
        with tempfile.TemporaryDirectory(prefix="restyle-submit-") as staging:
            working_dir = stage_working_dir(config, Path(staging), config_path)
            # submit_job uploads the working directory before it returns, so the staging copy can go.
            client.submit_job(
                entrypoint=shlex.join([*ENTRYPOINT, *output_options]),
                submission_id=submission_id,
                runtime_env={"working_dir": str(working_dir)},
                metadata={"restyle_config": Path(config_path).name},
            )
    except SubmitError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except AuthenticationError:
        print(
            f"error: the Ray job server at {address} requires a token: set RAY_AUTH_MODE=token and give the "
            "cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except (OSError, RuntimeError, ValueError) as error:  # unreachable (ConnectionError), bad address, refused
        print(f"error: cannot submit to the Ray job server at {address}: {error}", file=sys.stderr)
        return EXIT_CONFIG
    print(submission_id, file=out, flush=True)
    if not wait:
        return 0
    try:
        status = wait_for_job(client, submission_id, out)
    except KeyboardInterrupt:
        print(
            f"stopped waiting; job {submission_id} keeps running (ray job stop {submission_id} ends it)",
            file=sys.stderr,
        )
        return 130
    print(f"job {submission_id}: {status}{failure_detail(client, submission_id, status)}", file=out)
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def failure_detail(client, submission_id: str, status: str) -> str:
    """` (exit code N)` for a job whose entrypoint failed, ` (Ray's message)` otherwise; empty on success."""
    if status == "SUCCEEDED":
        return ""
    info = client.get_job_info(submission_id)
    if info.driver_exit_code is not None:
        return f" (exit code {info.driver_exit_code})"
    message = (info.message or "").strip().splitlines()
    return f" ({message[0]})" if message else ""


def refuse_inline_secrets(config: JobConfig, config_path: str | Path) -> None:
    """Raise `SubmitError` naming every inline credential field (never its value)."""
    fields = secret_fields(config)
    if fields:
        raise SubmitError(
            f"{config_path} holds credentials inline ({', '.join(fields)}); restyle submit does not ship them, "
            "because Ray keeps a job's working directory in the cluster's storage and shows its runtime "
            "environment. Remove them and let the cluster reach object storage with the pod's or node's "
            "identity, or with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN set on its nodes"
        )


def secret_fields(value: Any, path: str = "") -> list[str]:
    """Dotted paths (`source.storage.secret_access_key`, `operators[0]...`) of every set `SecretStr`."""
    if isinstance(value, SecretStr):
        return [path]
    if isinstance(value, BaseModel):
        return [
            found
            for name in type(value).model_fields
            for found in secret_fields(getattr(value, name), f"{path}.{name}" if path else name)
        ]
    if isinstance(value, list | tuple):
        return [found for index, item in enumerate(value) for found in secret_fields(item, f"{path}[{index}]")]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in secret_fields(item, f"{path}.{key}")]
    return []


def make_submission_id(config_path: str | Path) -> str:
    """`restyle-<config stem>-<8 hex digits>`, e.g. `restyle-demo-1f0c2a9b`."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(config_path).stem).strip("-") or "job"
    return f"restyle-{stem}-{uuid.uuid4().hex[:8]}"


def stage_working_dir(config: JobConfig, staging: Path, config_path: str | Path = "config") -> Path:
    """Copy the project's code (no caches, virtual environments or outputs) into `staging` and write
    the validated config there as `job.yaml`; return `staging`. Refuses a config with inline credentials."""
    refuse_inline_secrets(config, config_path)
    for name in SHIPPED_PACKAGES:
        if not (PROJECT_ROOT / name).is_dir():
            raise SubmitError(f"cannot find the {name}/ package under {PROJECT_ROOT} to ship with the job")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for name in SHIPPED_PACKAGES + SHIPPED_EXTRAS:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, staging / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, staging / name)
    (staging / JOB_CONFIG_NAME).write_text(
        f"# {Path(config_path).name} as validated by restyle submit, overrides applied\n" + dump_config(config)
    )
    return staging


def dump_config(config: JobConfig) -> str:
    """The config as YAML holding the fields it was given (defaults stay implicit); it validates back
    to an equal config."""
    text = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    if validate_config(yaml.safe_load(text)) != config:  # a field set by a validator would be lost
        text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return text


def wait_for_job(client, submission_id: str, out: TextIO) -> str:
    """Stream the job's logs to `out` until it ends; return its final status."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    # The log stream closes when the job ends, or early when the connection drops: poll to be sure.
    while (status := str(client.get_job_status(submission_id).value)) not in TERMINAL_STATUSES:
        time.sleep(STATUS_POLL_SECONDS)
    return status
