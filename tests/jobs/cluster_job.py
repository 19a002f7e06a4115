"""Run a job on a three-node local Ray cluster (`ray.cluster_utils.Cluster`), optionally removing a
worker node mid-job.

    python -m tests.jobs.cluster_job CONFIG.yaml [--gpu-worker] [--remove-worker-after N]

A head (1 CPU) and two workers (2 CPUs each); with --gpu-worker the second worker has 3 CPUs and
advertises one logical GPU. Prints `CLUSTER_JOB_RESULT {json}` with the summary, the node ids and whether the
job finished. Used by the multi-node tests; bounded by the caller's timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from jobs.config import validate_config
from jobs.pipeline import run_job

MEMORY = 150 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--gpu-worker", action="store_true")
    parser.add_argument("--remove-worker-after", type=int, default=None, metavar="COMMITS")
    args = parser.parse_args()
    config = validate_config(yaml.safe_load(Path(args.config).read_text()))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": MEMORY, "include_dashboard": False},
    )
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
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
