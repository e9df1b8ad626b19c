"""Ray for a study: one of its own, or the cluster at --address, each refusal in one line."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import typing
from collections.abc import Iterator

import ray
from ray.job_config import JobConfig

from study.plan import BadInput, this_machine

# Ray Train's controller polls its workers every 2 s by default, and a trial waits for a poll
# to start, to report and to end. Not 0.1 s, though faster still: a trial then once ended in
# Tune before its last epoch's report reached Tune. Figures: docs/performance.md.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def check_reachable(address: str) -> None:
    """Refuse a host:port where nothing listens, at once (Ray itself would retry for a minute);
    `auto` is left to Ray, which reads the address `ray start` recorded on this machine."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.removeprefix("ray://"), int(port)), timeout=5).close()
    except OSError as err:
        raise BadInput(f"--address {address}: cannot reach it ({err.strerror or err}); is "
                       "`ray start --head` running there, and is the port open?") from None


def start_ray(name: str, address: str | None = None, dashboard_host: str = "127.0.0.1"):
    """A Ray of this study's own (never one a `ray start` left running), or the cluster at
    `address`; the dashboard's Jobs page names the job after the experiment `name`. What the
    trials write to stderr (their warnings: trainable/logs.py) reaches this driver's."""
    job = JobConfig(metadata={"job_name": name})
    if not address:
        os.environ.update(RAY_ENV)
        machine = this_machine()
        return ray.init(address="local", num_cpus=int(machine["CPU"]),
                        num_gpus=int(machine["GPU"]), include_dashboard=True,
                        dashboard_host=dashboard_host, log_to_driver=True, job_config=job)
    check_reachable(address)
    # A refused token shows only in Ray's C++ log on stderr (a line a second for 20 s, then a
    # ConnectionError): keep that log aside, to tell the two causes apart in one line.
    with tempfile.TemporaryFile(mode="w+") as log:
        with stderr_to(log):
            try:
                context = ray.init(address=address, runtime_env={"env_vars": RAY_ENV},
                                   log_to_driver=True, job_config=job)
            except ConnectionError:
                context = None
        log.seek(0)
        said = log.read()
    if context is None and "InvalidAuthToken" in said:
        raise BadInput(f"--address {address}: the cluster refused this driver's token; "
                       "to an explicit address Ray sends one only with RAY_AUTH_MODE=token: set "
                       "it, and RAY_AUTH_TOKEN to what `ray get-auth-token` prints on the head "
                       "node (on the head node itself, --address auto needs neither)")
    if context is None:
        raise BadInput(f"--address {address}: no Ray cluster answered there; start one "
                       "with `ray start --head`, or check the address")
    sys.stderr.write(said)
    return context


@contextlib.contextmanager
def stderr_to(sink: typing.TextIO) -> Iterator[None]:
    """File descriptor 2 (Python's and the C++ libraries' stderr) into `sink` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def dashboard_line(url: str | None) -> str:
    if not url:
        return "Ray dashboard: not running"
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return f"Ray dashboard: http://{url} (token authentication off: RAY_AUTH_MODE=disabled)"
    return (f"Ray dashboard: http://{url} (it asks for the cluster's token: "
            "`ray get-auth-token` prints it)")
