"""Run a job on a three-node local Ray cluster and remove a worker node mid-job.

Run as `python -m tests.jobs.node_loss_job CONFIG.yaml`; prints the job's summary as JSON on the
last line. Used by tests/jobs/test_faults.py; bounded by the caller's timeout.
"""

from __future__ import annotations

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


def main(config_path: str) -> None:
    config = validate_config(yaml.safe_load(Path(config_path).read_text()))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": MEMORY, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=2, object_store_memory=MEMORY) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_job(config).summary
        except Exception as error:  # reported to the test through the output
            outcome["error"] = f"{type(error).__name__}: {error}"

    job = threading.Thread(target=run, daemon=True)
    job.start()
    commits = Path(config.sink.uri) / "_commits"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job.is_alive():
        if commits.exists() and len(list(commits.glob("*.json"))) >= 2:
            break
        time.sleep(0.2)
    removed_at = len(list(commits.glob("*.json"))) if commits.exists() else 0
    cluster.remove_node(workers[0], allow_graceful=False)
    job.join(timeout=240)
    outcome["removed_after_commits"] = removed_at
    outcome["finished"] = not job.is_alive()
    print("NODE_LOSS_RESULT " + json.dumps(outcome, default=str))
    sys.stdout.flush()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
