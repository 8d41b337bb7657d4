"""What machine a benchmark ran on, a process's memory, and the JSON a benchmark writes (shared by
the bench scripts)."""
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


def _status_kb(field: str) -> int:
    """A field of ``/proc/self/status`` in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def rss_gb() -> float:
    """This process's resident memory now, GB."""
    return _status_kb("VmRSS") / 1e6


def reset_peak_memory() -> None:
    """Start this process's peak resident memory (``VmHWM``) again from its current size (a
    child's ``ru_maxrss`` would carry its parent's peak)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_gb() -> float:
    """This process's peak resident memory since :func:`reset_peak_memory` (or its start), GB."""
    return _status_kb("VmHWM") / 1e6


def write_json(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (its folder made), under a temporary name renamed
    into place."""
    import json

    from scidiff.data.io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
    atomic_path(path, write)
