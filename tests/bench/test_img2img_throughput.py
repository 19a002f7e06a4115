"""The throughput benchmark's memory breakdown names each process by what it is, and its bounds from
Ray alone count only Ray's own processes (never the driver, the model actor or the CPU workers)."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import img2img_throughput
    import measure

    return img2img_throughput, measure


@pytest.mark.parametrize(
    ("command_line", "title"),
    [
        (
            ["/usr/bin/python3.11", "-u", "/x/ray/_private/log_monitor.py", "--session-dir=/tmp"],
            "python log_monitor.py",
        ),
        (["python", "-c", "from multiprocessing.spawn import spawn_main"], "python"),
        (["ray::MapWorker(MapBatches(Img2ImgModel))", ""], "ray::MapWorker(MapBatches(Img2ImgModel))"),
        (["ray::IDLE"], "ray::IDLE"),
        (["/x/ray/core/src/ray/gcs/gcs_server", "--port=0"], "gcs_server"),
        ([], "zombie-name"),
    ],
)
def test_processes_are_titled_by_what_they_run(bench, command_line, title):
    _, measure = bench
    assert measure.process_title(command_line, "zombie-name") == title


def test_the_bounds_from_ray_count_only_rays_own_processes(bench):
    throughput, _ = bench
    breakdown = {
        "side process": 200.0,
        "gcs_server": 45.0,
        "raylet": 28.0,
        "python log_monitor.py": 43.0,
        "ray::DashboardAgent": 75.0,
        "ray::_StatsActor.register_dataset": 106.0,
        "ray::ActorLocationTracker": 59.0,
        "ray::MapWorker(MapBatches(Img2ImgModel))": 570.0,
        "ray::IDLE": 140.0,
        "ray::MapBatches(Img2ImgPrepare)": 130.0,
    }
    own = throughput.ray_own_mib(breakdown)
    assert own == 45 + 28 + 43 + 75 + 106 + 59
    plain = {"total_seconds": 10.0, "peak_uss_bytes": 500 * throughput.MEBIBYTE}
    restyle = {"load_seconds": 2.5, "ray_own_uss_mib_at_peak": own}
    assert throughput.ceiling_ratio(plain, restyle) == pytest.approx(10 / 12.5)
    assert throughput.floor_ratio(plain, restyle) == pytest.approx((500 + own) / 500)
