"""Whether a model hub can be reached: asked before a download is tried, so an offline machine gets one clear
line instead of a long timeout."""
from __future__ import annotations

import socket


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
