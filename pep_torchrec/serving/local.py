"""Running the service on this machine's loopback: a free port, and waiting until it is ready (the
demo, the serving benchmark and the tests start it this way)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `base_url`/readyz until it answers 200.

    Raises:
        RuntimeError: `alive()` turned False (the server process exited) or `timeout_s` passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(base_url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused while starting, or 503 until the model is loaded (HTTPError)
            pass
        if not alive():
            raise RuntimeError(f"{base_url}: the server exited before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url}: not ready after {timeout_s:g} s")
        time.sleep(0.1)
