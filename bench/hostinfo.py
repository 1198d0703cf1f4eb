"""What the benchmark scripts that start a service share: the CPU's name for their table,
and a free loopback port (no torch import: they time a server, not a model)."""

from __future__ import annotations

import platform
import socket
import subprocess


def cpu_model() -> str:
    """lscpu's model name (the table's machine column), else what Python knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
