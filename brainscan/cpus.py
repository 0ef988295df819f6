"""CPUs this process may use: its CPU affinity, capped by the CPU limit of its container's cgroup.

A pod's CPU limit is a CFS quota, not a set of cores: `os.cpu_count()` and the affinity mask see
every core of the node, so a pool sized by them on a 64-core node with a 2-CPU limit runs 64
threads that the kernel throttles to 2. Kubernetes writes the limit to the container's cgroup:
cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for none), cgroup v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none).

Standard library only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"  # the container's own cgroup (cgroup namespace), as Kubernetes mounts it
# cgroup v1 mounts the cpu controller under one of these names (cpu and cpuacct are often joined)
_V1_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu", ".")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit(root: str | Path | None = None) -> float | None:
    """The cgroup's CPU limit in CPUs (quota / period, e.g. 1.5), or None when it has none."""
    root = Path(root or CGROUP_ROOT)
    text = _read(root / "cpu.max")  # cgroup v2
    if text is not None:
        quota, _, period = text.partition(" ")
        if quota == "max" or not quota.isdigit() or not period.strip().isdigit() or int(period) <= 0:
            return None
        return int(quota) / int(period)
    for name in _V1_DIRS:  # cgroup v1
        quota, period = _read(root / name / "cpu.cfs_quota_us"), _read(root / name / "cpu.cfs_period_us")
        if quota is None or period is None:
            continue
        try:
            quota_us, period_us = int(quota), int(period)
        except ValueError:
            return None
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def cpu_count(cgroup_root: str | Path | None = None) -> int:
    """CPUs this process may run on: its affinity, at most its cgroup's CPU limit rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)
