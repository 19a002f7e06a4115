"""Ray instances the tests start in processes of their own, each in a private temp dir, and stop
again in `finally`: none joins or disturbs another Ray on the machine, and none outlives the test run.

A temp dir of its own means a head started by `ray start` writes its `ray_current_cluster` there, not
in `/tmp/ray` where a later `ray.init()` would find it. Paths stay short: Ray's socket paths are
length-limited (about 107 characters).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile

import psutil

STOP_SECONDS = 20
PR_SET_PDEATHSIG = 1


def private_temp_dir() -> str:
    """A new, short temp dir under /tmp for one Ray instance (or one RAY_TMPDIR)."""
    return tempfile.mkdtemp(prefix="rs-", dir="/tmp")


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the `finally` clauses still stop it
        pass


def start_process(command: list[str], env: dict, log_path: str) -> subprocess.Popen:
    """Start a Ray process in a process group of its own that ends when the test process ends."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def ray_processes(process: subprocess.Popen, temp_dir: str) -> list[psutil.Process]:
    """The process, its descendants, and any process started in its temp dir (a job's driver runs
    in a session of its own)."""
    found = {}
    try:
        root = psutil.Process(process.pid)
        for child in [root, *root.children(recursive=True)]:
            found[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    for candidate in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmdline, cwd = candidate.info["cmdline"] or (), candidate.info["cwd"] or ""
        except psutil.Error:
            continue
        if any(temp_dir in part for part in cmdline) or temp_dir in cwd:
            found[candidate.pid] = candidate
    return list(found.values())


def stop_ray_process(process: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the process (`ray start --block` shuts its node down), kill whatever of it is left,
    and remove its temp dir. Never `ray stop`, which stops every Ray on the machine."""
    started = ray_processes(process, temp_dir)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    started += ray_processes(process, temp_dir)
    for leftover in started:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=STOP_SECONDS)
    _, alive = psutil.wait_procs(started, timeout=STOP_SECONDS)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not alive, f"Ray processes of the test survived: {alive}"


# Set by `ray.init` in the calling process, or naming a cluster: never passed on to a child.
RAY_INIT_VARIABLES = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_CLIENT_MODE", "PYTHONBREAKPOINT")


def environment(ray_tmpdir: str, **extra: str) -> dict:
    """This environment without RAY_ADDRESS, with Ray's temp root in `ray_tmpdir`. Also without what
    `ray.init` puts into its own process's environment (the suite's Ray session sets RAY_AUTH_MODE=token,
    which a driver joining a head started without token auth must not inherit)."""
    env = {key: value for key, value in os.environ.items() if key not in RAY_INIT_VARIABLES}
    env["RAY_TMPDIR"] = ray_tmpdir
    env.update(extra)
    return env
