"""`[server] workers`: a supervisor and worker processes serving on the same listeners
(supervisor.py, worker.py), the control channel between them (channel.py), the host's limiter
counters kept by the supervisor (limits.py), and one answer for the host from every worker's
(views.py, merge.py). README "Workers" says what is shared and what is per worker.
"""

from __future__ import annotations

import os


def worker_count(setting: int | str) -> int:
    """[server] workers: "auto" is one per CPU this process may run on (its affinity, which
    systemd's CPUAffinity= and containers' cpusets set), not every CPU of the machine."""
    if setting == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(setting)
