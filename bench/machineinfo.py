"""Facts about the machine a bench ran on, shared by every bench command."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.0f} GiB"
    except (OSError, ValueError):
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model, "memory": mem,
            "kernel": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}
