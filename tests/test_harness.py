"""The test harness itself: ending the session's Ray ends only the processes that Ray started,
never another Ray on the machine (a user's cluster, or another test run's)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from .conftest import stop_ray_started_in

# A stand-in head: names its temp dir in its arguments, as Ray's GCS and raylet do, and starts
# a child that does not (as a Ray worker, which renames itself).
HEAD = ("import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "time.sleep(120)")
# A client server: names only the head's GCS address.
CLIENT = "import time; time.sleep(120)"


def _start(code: str, *args: str) -> psutil.Process:
    return psutil.Process(subprocess.Popen([sys.executable, "-c", code, *args]).pid)


def _child(head: psutil.Process) -> psutil.Process:
    deadline = time.monotonic() + 30
    while not head.children():
        assert time.monotonic() < deadline, "the stand-in head started no child"
        time.sleep(0.05)
    (child,) = head.children()
    return child


def _alive(process: psutil.Process) -> bool:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def test_only_the_processes_of_the_session_s_own_ray_are_ended(tmp_path):
    ours = _start(HEAD, f"--temp-dir={tmp_path / 'ray-ours'}")
    our_client = _start(CLIENT, "--address=127.0.0.1:6390")
    theirs = _start(HEAD, f"--temp-dir={tmp_path / 'ray-theirs'}")
    their_client = _start(CLIENT, "--address=127.0.0.1:6391")
    started = [ours, our_client, theirs, their_client, _child(ours), _child(theirs)]
    try:
        stop_ray_started_in(str(tmp_path / "ray-ours"), 6390)
        assert [_alive(p) for p in started] == [False, False, True, True, False, True]
    finally:
        for process in started:
            if _alive(process):
                process.kill()
