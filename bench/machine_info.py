"""What machine a benchmark ran on, for the JSON it writes (shared by the bench scripts)."""
from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where that is absent)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**versions: str) -> dict:
    """CPU, cores, platform, Python, the given package versions and the load average at start."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), **versions, "load_average_at_start": list(os.getloadavg())}
