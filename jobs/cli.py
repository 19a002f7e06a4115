"""The `restyle` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback

from jobs.config import JobConfig, load_config
from operators.base import UserError
from operators.storage import redact

logger = logging.getLogger("restyle")

EXIT_CONFIG = 2
EXIT_FAILED = 1
# Set to 1 to let unexpected exceptions propagate with their traceback on stderr.
DEBUG_VARIABLE = "RESTYLE_DEBUG"
# Where a failed command's traceback is written (default: restyle-logs/ in the temporary directory).
LOG_DIR_VARIABLE = "RESTYLE_LOG_DIR"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `restyle` console script."""
    parser = argparse.ArgumentParser(prog="restyle", description="Batch image-to-image jobs on Ray Data.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {restyle_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or --dry-run) a YAML job")
    run.add_argument("config", help="job YAML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="dotted.path=value",
        help="override a config value (YAML-parsed), e.g. --set operators.0.strength=0.4; repeatable",
    )
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan without running")
    run.add_argument(
        "--rerun-failed", action="store_true", help="redo only the inputs whose committed rows have status error"
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="proceed in a sink holding files restyle did not write (they are kept; overwrite deletes only its own)",
    )

    submit = commands.add_parser("submit", help="submit a YAML job to a Ray cluster (Ray's job submission API)")
    submit.add_argument("config", help="job YAML file")
    submit.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
        help="the cluster's job server, http://HEAD:8265 (default, as for `ray job submit`: RAY_API_SERVER_ADDRESS, "
        "then RAY_ADDRESS, else http://127.0.0.1:8265)",
    )
    submit.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its status")
    submit.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="dotted.path=value",
        help="override a config value before submitting; repeatable",
    )

    tiny = commands.add_parser("make-tiny-models", help="build tiny random diffusers pipelines offline")
    tiny.add_argument("directory")

    demo_data = commands.add_parser(
        "make-demo-data",
        help="write demo data: scikit-image's photos as Parquet, pydicom's CT/MR files as a DICOM folder",
    )
    demo_data.add_argument("directory")

    push = commands.add_parser("push", help="upload a finished sink to a Hugging Face Hub dataset repository")
    push.add_argument("sink", help="the job's sink.uri (a local folder)")
    push.add_argument("repo", help="dataset repository, e.g. NAME/DATASET (created if absent)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token-env", metavar="VAR", help="variable holding the Hub token (default: HF_TOKEN or login)")

    # Before or after the command: `restyle -q run job.yaml` and `restyle run job.yaml -q` alike.
    add_output_options(parser, defaults=True)
    for command in commands.choices.values():
        add_output_options(command, defaults=False)
    args = parser.parse_args(argv)
    from jobs.progress import configure_output

    configure_output(args.log_level, verbose=args.verbose, quiet=args.quiet)
    try:
        return _command(args)
    except Exception as error:
        return report_failure(error, f"{args.command} failed", "traceback in")


def add_output_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """-q/--quiet, --log-level and --verbose. A command's parser sets no defaults, so an option given
    before the command is not reset by the command's own parser."""
    from jobs.progress import LOG_LEVELS

    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="print only errors and, at the end, where the outputs, summary and report are",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default=default("info"), help="restyle's log level (default: info)"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default(False),
        help="also show Ray's own start-up lines, Ray Data's progress bars and status block, and library notices",
    )


def output_options(args: argparse.Namespace) -> list[str]:
    """The output options given (see `add_output_options`), as `restyle run` takes them on a cluster."""
    options = ["-q"] if args.quiet else []
    options += ["--verbose"] if args.verbose else []
    return options + (["--log-level", args.log_level] if args.log_level != "info" else [])


def restyle_version() -> str:
    """The installed restyle's version (its package metadata)."""
    from importlib import metadata

    try:
        return metadata.version("restyle")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command; a `UserError` from anywhere in it becomes one `error:` line and exit 2."""
    if args.command == "make-tiny-models":
        from jobs.tiny_models import make_tiny_models

        for name, path in make_tiny_models(args.directory).items():
            print(f"{name}: {path}")
        return 0
    if args.command == "make-demo-data":
        from jobs.demo import make_demo_data, make_medical_demo_data

        print(make_demo_data(args.directory))
        print(make_medical_demo_data(args.directory))
        return 0

    if args.command == "push":
        from jobs.hub import push

        url, files = push(args.sink, args.repo, private=args.private, token_env=args.token_env)
        print(f"pushed {len(files)} files to {url}")
        return 0

    if args.command == "submit":
        from jobs.submit import submit as submit_job

        return submit_job(
            args.config, args.address, overrides=args.overrides, wait=args.wait, output_options=output_options(args)
        )

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(config)
    return run_config(config, rerun_failed=args.rerun_failed, force=args.force, verbose=args.verbose, quiet=args.quiet)


def dry_run(config: JobConfig) -> int:
    """Validate, resolve what can be resolved without running, and print the plan."""
    from jobs.commits import check_sink_location
    from jobs.pipeline import PlanError, assumed_resources, plan_job, ray_address_setting, reachable_address
    from jobs.sources import SourceInfo, check_ids, inspect_source
    from operators.models import vet_models

    problems = []
    try:
        info = inspect_source(config.source)
        check_ids(config.source, info)  # in this process: a dry run starts no Ray
    except (UserError, OSError) as error:  # StorageUnreachableError is both
        problems.append(f"source: {error}")
        info = SourceInfo(fragments=[])
    problems += vet_models(config.operators, config.run.offline)
    try:
        check_sink_location(config)
    except UserError as error:
        problems.append(str(error))
    field_name, address = ray_address_setting(config)
    if address is not None and address != "local":
        try:
            reachable_address(field_name, address)
        except UserError as error:
            problems.append(str(error))
    try:
        print(plan_job(config, info, *assumed_resources(config)).describe())
    except PlanError as error:
        problems.append(str(error))
    for problem in problems:
        print(f"error: {redact(problem)}", file=sys.stderr)
    return EXIT_CONFIG if problems else 0


def run_config(
    config: JobConfig, rerun_failed: bool = False, force: bool = False, verbose: bool = False, quiet: bool = False
) -> int:
    """Run a validated job; print its summary (not when `quiet`) and where its outputs, summary and
    report are.

    A `UserError` (bad source, sink, plan, model) is one `error:` line and exit 2; any other failure
    of the job is one `error: job failed: TYPE: first line (full log in PATH)` line and exit 1, with
    the traceback and Ray's log directory in that file (RESTYLE_DEBUG=1 raises it instead)."""
    from jobs.pipeline import run_job
    from jobs.report import AccountingError

    try:
        result = run_job(config, rerun_failed=rerun_failed, force=force, verbose=verbose, quiet=quiet)
    except AccountingError as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:
        return report_failure(error, "job failed", "full log in")
    summary = result.summary
    if not quiet:
        print(json.dumps(summary, indent=2))
    print(f"outputs: {config.sink.uri}/data/*.parquet")
    print(f"summary: {config.sink.uri}/summary.json")
    print(f"report:  {summary['report']}")
    return 0


def report_failure(error: Exception, what: str, log_label: str) -> int:
    """Print one `error:` line for an exception and return the exit code: 2 for a `UserError`, else 1
    with the traceback written to a log file (re-raised instead under RESTYLE_DEBUG=1)."""
    user_error, cause = describe_failure(error)
    if user_error:
        print(f"error: {cause}", file=sys.stderr)
        return EXIT_CONFIG
    if os.environ.get(DEBUG_VARIABLE) == "1":
        raise error
    print(f"error: {what}: {cause} ({log_label} {write_failure_log(error)})", file=sys.stderr)
    return EXIT_FAILED


def describe_failure(error: BaseException) -> tuple[bool, str]:
    """Whether an exception is the user's to fix (a `UserError`, also when a Ray task raised it),
    and what to print: a `UserError`'s message, else `TYPE: first line of the message`."""
    cause = ray_cause(error)
    if isinstance(cause, UserError):
        return True, redact(str(cause))
    remote = remote_root(error)
    if remote is not None:
        name, message = remote
        if _is_user_error_class(name):
            return True, redact(message)
        return False, redact(f"{name.rsplit('.', 1)[-1]}: {message}")
    lines = str(cause).strip().splitlines()
    return False, redact(f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__)


def ray_cause(error: BaseException) -> BaseException:
    """The exception behind Ray's wrappers: a task's or actor's error as the driver receives it
    (`RayTaskError`, Ray Data's `UserCodeException`) is reported as what the task raised."""
    for _ in range(16):
        inner = getattr(error, "cause", None)
        if isinstance(inner, BaseException) and inner is not error:
            error = inner
        elif type(error).__module__.startswith("ray.") and error.__cause__ is not None:
            error = error.__cause__
        else:
            break
    return error


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")
_CHAINED = re.compile(r"\n(?:The above exception was the direct cause|During handling of the above exception)")


def remote_root(error: BaseException) -> tuple[str, str] | None:
    """(type, first message line) of the first exception in a Ray task's remote traceback: the
    driver gets the task's error as text (Ray Data wraps it in `UserCodeException`)."""
    item: BaseException | None = error
    for _ in range(16):
        if item is None:
            return None
        # A task's error renders as its remote traceback (the dual `RayTaskError(X)` keeps only that).
        text = getattr(item, "traceback_str", None) or (str(item) if type(item).__module__.startswith("ray.") else None)
        if isinstance(text, str):
            lines = _CHAINED.split(_ANSI.sub("", text))[0].splitlines()
            frames = [index for index, line in enumerate(lines) if line.startswith('  File "')]
            for line in lines[frames[-1] + 1 :] if frames else ():
                match = _EXCEPTION_LINE.match(line)
                if match:
                    return match.group(1), match.group(2)
        item = getattr(item, "cause", None) or item.__cause__
    return None


def _is_user_error_class(qualified_name: str) -> bool:
    """Whether a remote exception's `module.Class` is one of restyle's `UserError` subclasses."""
    import importlib

    module_name, _, name = qualified_name.rpartition(".")
    if not module_name.startswith(("jobs.", "operators.")):
        return False
    try:
        found = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, UserError)


def write_failure_log(error: BaseException) -> str:
    """Write the traceback (and where Ray keeps its workers' logs) to a new file; return its path."""
    directory = os.environ.get(LOG_DIR_VARIABLE) or os.path.join(tempfile.gettempdir(), "restyle-logs")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"restyle-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    text = "".join(traceback.format_exception(error))
    ray_logs = _ray_log_directory()
    if ray_logs:
        text += f"\nRay's logs (every worker and actor of this job): {ray_logs}\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(redact(text))
    return path


def _ray_log_directory() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # a log location is a courtesy; never let it hide the failure itself
        return None
    return None


if __name__ == "__main__":
    sys.exit(main())
