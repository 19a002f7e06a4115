"""Several nodes on one machine: actors spread over them, GPU operators land only where a GPU is
advertised, fractional GPU requests share it, and the output is complete."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import yaml

from tests.jobs.test_faults import ROWS, run_on_cluster, write_folder


def test_actors_spread_and_gpu_stages_land_on_the_gpu_node(sd_model, tmp_path):
    folder, sink = tmp_path / "in", tmp_path / "out"
    write_folder(folder)
    config = {
        "source": {"uri": str(folder), "format": "images", "read_blocks": ROWS},
        "operators": [
            {
                "kind": "standardize",
                "steps": [{"op": "normalize"}],
                "output_mode": "rgb",
                "num_actors": 2,
                # Two CPUs per actor: no node can hold both, so the pool must span two nodes.
                "num_cpus": 2,
                "batch_size": 1,
            },
            {
                "kind": "img2img",
                "model": str(sd_model),
                "prompt": "x",
                "num_inference_steps": 2,
                "strength": 0.5,
                "num_gpus": 0.5,
                "num_cpus": 0.5,
                "device": "cpu",
                "batch_size": 1,
            },
        ],
        "sink": {"uri": str(sink)},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    outcome = run_on_cluster(tmp_path / "job.yaml", "--gpu-worker")
    summary, nodes = outcome["summary"], outcome["nodes"]
    assert (summary["rows_out"], summary["ok"], summary["missing"], summary["duplicated"]) == (ROWS, ROWS, 0, 0)

    table = pq.read_table(sink / "data").to_pylist()
    generated_on = Counter(row["img2img"]["node_id"] for row in table)
    # Two actors of half a GPU each: both on the only node that advertises a GPU.
    assert set(generated_on) == {nodes["other_worker"]}
    img2img_actors = [actor["node"] for actor in outcome["actors"] if "Img2Img" in (actor["class"] or "")]
    standardize_actors = [actor["node"] for actor in outcome["actors"] if "Standardize" in (actor["class"] or "")]
    assert len(img2img_actors) >= 2 and set(img2img_actors) == {nodes["other_worker"]}, outcome["actors"]
    # The CPU stage's two actors were spread over two nodes.
    assert len(set(standardize_actors)) == 2, outcome["actors"]
    assert set(standardize_actors) <= set(nodes.values())
