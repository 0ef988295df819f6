"""A liveness file: a long-running loop touches it as it makes progress, a probe reads its age.

The retrain watcher touches its heartbeat at every check and while it reads images;
`brainscan retrain alive` (the watcher's liveness probe, infra/k8s/retrain/) fails once the file
is older than the allowed age, so Kubernetes restarts a watcher stuck in a call that never ends.
Standard library only: the probe runs often and must start fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def beat(path: str | Path) -> None:
    """Set the file's modification time to now (creating it and its folder the first time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path)


def age_s(path: str | Path) -> float | None:
    """Seconds since the last beat, or None when there was none."""
    try:
        return max(0.0, time.time() - Path(path).stat().st_mtime)
    except FileNotFoundError:
        return None


def check(path: str | Path, max_age_s: float) -> tuple[bool, str]:
    """(alive, why): alive when the file was touched within `max_age_s` seconds."""
    age = age_s(path)
    if age is None:
        return False, f"no heartbeat at {path}"
    if age > max_age_s:
        return False, f"heartbeat {path} is {age:.0f}s old, more than {max_age_s:.0f}s: the loop is stuck"
    return True, f"heartbeat {path} is {age:.0f}s old"
