"""The `restyle` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jobs.config import ConfigError, JobConfig, load_config

logger = logging.getLogger("restyle")

EXIT_CONFIG = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `restyle` console script."""
    parser = argparse.ArgumentParser(prog="restyle", description="Batch image-to-image jobs on Ray Data.")
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
        help="write demo data: scikit-image's photos as Parquet, pydicom's CT/MR slices as 16-bit PNGs",
    )
    demo_data.add_argument("directory")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

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

    if args.command == "submit":
        from jobs.submit import submit as submit_job

        return submit_job(args.config, args.address, overrides=args.overrides, wait=args.wait)

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        return dry_run(config)
    return run_config(config, rerun_failed=args.rerun_failed)


def dry_run(config: JobConfig) -> int:
    """Validate, resolve what can be resolved without running, and print the plan."""
    from jobs.pipeline import PlanError, assumed_resources, plan_job
    from jobs.sources import SourceError, SourceInfo, inspect_source
    from operators.models import ModelError, check_model_files, is_hub_id

    problems = []
    try:
        info = inspect_source(config.source)
    except (SourceError, OSError) as error:
        problems.append(f"source: {error}")
        info = SourceInfo(ids=[])
    for index, operator in enumerate(config.operators):
        model = getattr(operator, "model", None)
        if model and "://" not in model and not is_hub_id(model):
            try:
                from pathlib import Path

                check_model_files(Path(model))
            except (ModelError, OSError) as error:
                problems.append(f"operators[{index}].model: {error}")
    try:
        plan = plan_job(config, info, *assumed_resources(config))
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    print(plan.describe())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_CONFIG if problems else 0


def run_config(config: JobConfig, rerun_failed: bool = False) -> int:
    """Run a validated job; print where its outputs, summary and report are."""
    from jobs.commits import SinkError
    from jobs.pipeline import PlanError, run_job
    from jobs.report import AccountingError
    from jobs.sources import SourceError

    try:
        result = run_job(config, rerun_failed=rerun_failed)
    except (SourceError, SinkError, PlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except AccountingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    summary = result.summary
    print(json.dumps(summary, indent=2))
    print(f"outputs: {config.sink.uri}/data/*.parquet")
    print(f"summary: {config.sink.uri}/summary.json")
    print(f"report:  {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
