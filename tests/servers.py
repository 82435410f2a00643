"""Helpers for tests that start a real server process (mlflow server, `automl ui`, mlflow models serve)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float, output: Callable[[], str]) -> None:
    """Poll ``url`` until it answers 200; fail with the server's ``output()`` if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{proc.args[:4]} exited:\n{output()[-3000:]}"
        assert time.monotonic() < deadline, f"no answer on {url} in {timeout} s:\n{output()[-3000:]}"
        time.sleep(0.25)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True`` and every process it started (web workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
