"""Who this process is, as its claims record it."""

from __future__ import annotations

import os
import socket


def instance_id() -> str:
    """``POD_NAME`` (set from the Deployment's downward API), else ``hostname-pid``."""
    pod = os.environ.get("POD_NAME", "").strip()
    return pod[:100] if pod else f"{socket.gethostname()}-{os.getpid()}"[:100]
