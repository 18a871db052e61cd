"""The scripted roles of tests/scripted_roles.py, slowed down so a fault test's SIGKILL lands while steps are running.

``UMIQ_TEST_ROLE_DELAY_S`` is each step's generation time. A user turn containing ``CRASH`` makes the caller kill
its own worker process (SIGKILL, as the kernel's OOM killer would): a poison step that no retry can get through.
"""

from __future__ import annotations

import os
import signal
import time

from orchestrator.protocol import Prompt
from tests import scripted_roles

__all__ = ["planner", "caller", "summarizer"]

_DELAY_S = float(os.environ.get("UMIQ_TEST_ROLE_DELAY_S", "0.1"))


def planner(prompt: Prompt) -> str:
    time.sleep(_DELAY_S)
    return scripted_roles.planner(prompt)


def caller(prompt: Prompt) -> str:
    time.sleep(_DELAY_S)
    if "CRASH" in scripted_roles._current_turn(scripted_roles._text(prompt)):
        os.kill(os.getpid(), signal.SIGKILL)
    return scripted_roles.caller(prompt)


def summarizer(prompt: Prompt) -> str:
    time.sleep(_DELAY_S)
    return scripted_roles.summarizer(prompt)
