"""Whether a process runs on this machine: the one test behind every "left by a killed run" cleanup
(the preprocessing cache's temporary entries, merges and exports written under ``.NAME.*-PID``).
Standard library only."""

from __future__ import annotations

import os


def pid_running(pid: int) -> bool:
    """True while process `pid` exists here (this process included, and another user's, which we may not
    signal); False once it has exited."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True
