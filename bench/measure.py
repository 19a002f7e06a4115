"""What the benchmarks share: a sampler of a process tree's memory, and running a side in its own
spawned process (its set-up, its reply, waiting for it). Each benchmark script imports this file from beside it."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import traceback
from pathlib import Path

MEBIBYTE = 1024 * 1024
# Reading one process's unique set size costs about 3 ms of CPU: sampling a dozen processes much more
# often than this would take CPU from the side being measured.
SAMPLE_INTERVAL_SECONDS = 0.5


class ProcessTreePeakUss:
    """Samples the summed unique set size of a process and all its descendants in a background thread;
    keeps the peak, how many processes it was summed over, and each process's share at the peak."""

    def __init__(self, pid: int, interval_seconds: float = SAMPLE_INTERVAL_SECONDS):
        self.pid = pid
        self.interval_seconds = interval_seconds
        self.peak_bytes = 0
        self.processes_at_peak = 0
        self.breakdown_at_peak: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uss-sampler", daemon=True)

    def __enter__(self) -> ProcessTreePeakUss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """Add one sample; processes that exit while being read are skipped."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        counted = 0
        breakdown: dict[str, float] = {}
        for process in processes:
            try:
                uss = process.memory_full_info().uss
                name = "side process" if process.pid == self.pid else process_title(process.cmdline(), process.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += uss
            counted += 1
            breakdown[name] = breakdown.get(name, 0.0) + uss / MEBIBYTE
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.processes_at_peak = counted
            self.breakdown_at_peak = breakdown

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_seconds)


def process_title(command_line: list[str], name: str) -> str:
    """What a process of a side is, for the memory breakdown: Ray's workers by what they run (Ray sets
    their title: "ray::MapWorker(...)", "ray::IDLE"), a Python process by its script ("python
    log_monitor.py", one of Ray's own), anything else by its program ("gcs_server", "raylet")."""
    if not command_line:
        return name
    program = Path(command_line[0]).name.split(" ")[0][:60] or name
    if program.startswith("python"):
        scripts = [argument for argument in command_line[1:] if argument.endswith(".py")]
        return f"python {Path(scripts[0]).name}" if scripts else "python"
    return program


def prepare_spawned_side(logger: logging.Logger) -> None:
    """Ready a side's spawned process: warnings logged, Ray run locally (RAY_ADDRESS is ignored: a
    benchmark measures this machine), and the benchmark script's functions and classes sent to Ray's
    workers by value (in a spawned process the script is the module `__mp_main__`, which workers
    cannot import)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.pop("RAY_ADDRESS", None):
        logger.warning("ignoring RAY_ADDRESS: the benchmark measures this machine, so Ray runs locally")
    import ray.cloudpickle

    script = sys.modules.get("__mp_main__")
    if script is not None:
        ray.cloudpickle.register_pickle_by_value(script)


def in_spawned_process(child, arguments: tuple, name: str, sample_memory: bool = False):
    """Run `child(*arguments, connection)` in a fresh spawned process, so that a side is charged for
    nothing another left behind, and wait for the dict it sends; with `sample_memory`, sample that
    process tree's unique set size meanwhile. Returns (reply, the sampler or None); a side that
    failed, or exited without replying, raises naming it."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(*arguments, sender), name=name)
    process.start()
    sender.close()
    with ProcessTreePeakUss(process.pid) if sample_memory else contextlib.nullcontext() as tree:
        try:
            reply = receiver.recv()
        except EOFError:
            reply = {"failure": f"the {name} process exited with code {process.exitcode} before reporting"}
        process.join()
    if "failure" in reply:
        raise RuntimeError(f"{name} failed:\n{reply['failure']}")
    return reply, tree


def send_reply(connection, produce) -> None:
    """In a side's process: send what `produce()` returns, or the traceback of its failure."""
    try:
        connection.send(produce())
    except BaseException:
        connection.send({"failure": traceback.format_exc()})
        raise
    finally:
        connection.close()
