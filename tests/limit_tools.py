"""Tools that break the tools pool's limits on purpose; tests/test_tool_limits.py has a real tools worker import them.

Kept out of the test module so that only that worker registers them, never the test process's own registry.
"""

from __future__ import annotations

import time

from workers.tools.python_tools import tool

__all__ = ["TOOLSET", "hog", "hang", "ping"]

TOOLSET = "limits_test"


@tool(toolset=TOOLSET)
def hog(mb: int) -> int:
    """Hold ``mb`` megabytes, taken 16 MB at a time as a leaking tool would, and report how many it held.

    Args:
        mb: Megabytes to allocate.
    """
    chunks = [bytearray(16 * 2**20) for _ in range(mb // 16)]
    return sum(len(chunk) for chunk in chunks) // 2**20


@tool(toolset=TOOLSET)
def hang(seconds: float) -> str:
    """Sleep, as a tool stuck on a dead network peer would.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "woke up"


@tool(toolset=TOOLSET)
def ping() -> str:
    """Answer at once: shows the process that ran a stopped call still serves."""
    return "pong"
