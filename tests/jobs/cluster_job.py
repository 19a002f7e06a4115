"""Run a job on a three-node local Ray cluster (`ray.cluster_utils.Cluster`), optionally removing a
worker node mid-job.

    python -m tests.jobs.cluster_job CONFIG.yaml [--gpu-worker] [--remove-worker-after N]

A head (1 CPU) and two workers (2 CPUs each); with --gpu-worker the second worker has 3 CPUs and
advertises one logical GPU. Prints `CLUSTER_JOB_RESULT {json}` with the summary, the node ids and whether the
job finished. Used by the multi-node tests; bounded by the caller's timeout. The cluster ends with this
process (or when its parent dies), and its Ray files, `ray_current_cluster` included, stay out of /tmp/ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from jobs.config import validate_config
from jobs.pipeline import run_job
from tests.jobs.ray_heads import die_with_parent, private_temp_dir

MEMORY = 150 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--gpu-worker", action="store_true")
    parser.add_argument("--remove-worker-after", type=int, default=None, metavar="COMMITS")
    args = parser.parse_args()
    config = validate_config(yaml.safe_load(Path(args.config).read_text()))
    die_with_parent()
    # `Cluster` writes the head's address to ray_current_cluster in Ray's temp root: keep that root
    # private (the suite sets RAY_TMPDIR; run alone, a dir of its own), never /tmp/ray.
    temp_root = None if os.environ.get("RAY_TMPDIR") else private_temp_dir()
    if temp_root:
        os.environ["RAY_TMPDIR"] = temp_root
    try:
        run(args, config)
    finally:
        if temp_root:
            shutil.rmtree(temp_root, ignore_errors=True)


def run(args: argparse.Namespace, config) -> None:
    """Start the cluster, run the job on it, print the outcome, and shut everything down."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": MEMORY, "include_dashboard": False},
    )
    try:
        run_on(cluster, args, config)
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_on(cluster: Cluster, args: argparse.Namespace, config) -> None:
    """Add the workers, run the job, and print CLUSTER_JOB_RESULT."""
    cpu_worker = cluster.add_node(num_cpus=2, object_store_memory=MEMORY)
    other_worker = cluster.add_node(
        num_cpus=3 if args.gpu_worker else 2, num_gpus=1 if args.gpu_worker else 0, object_store_memory=MEMORY
    )
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    outcome: dict = {
        "nodes": {
            "head": cluster.head_node.node_id,
            "cpu_worker": cpu_worker.node_id,
            "other_worker": other_worker.node_id,
        }
    }

    def run() -> None:
        try:
            outcome["summary"] = run_job(config).summary
        except Exception as error:  # reported to the test through the output
            outcome["error"] = f"{type(error).__name__}: {error}"

    job = threading.Thread(target=run, daemon=True)
    job.start()
    if args.remove_worker_after is not None:
        commits = Path(config.sink.uri) / "_commits"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and job.is_alive():
            if commits.exists() and len(list(commits.glob("*.json"))) >= args.remove_worker_after:
                break
            time.sleep(0.2)
        outcome["removed_after_commits"] = len(list(commits.glob("*.json"))) if commits.exists() else 0
        cluster.remove_node(cpu_worker, allow_graceful=False)
    job.join(timeout=240)
    outcome["finished"] = not job.is_alive()
    # Where each actor ran (dead ones included), from the cluster's own actor table.
    outcome["actors"] = [
        {"class": actor.get("ActorClassName"), "node": (actor.get("Address") or {}).get("NodeID")}
        for actor in ray._private.state.actors().values()
    ]
    print("CLUSTER_JOB_RESULT " + json.dumps(outcome, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
