"""The embedded broker: kombu's filesystem transport with atomic message writes (broker URL ``umiqfs://``).

kombu's own ``_put`` creates the message file and then writes it under an advisory lock, but a consumer claims
files with ``rename``, which ignores that lock: under load it can claim an empty file and the message is lost.
Writing to a temporary name and renaming it into place makes a message visible only once it is complete.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps

__all__ = ["SCHEME", "Channel", "Transport"]

SCHEME = "umiqfs"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.part"  # consumers match '<queue>.msg' exactly, so they never see this name
        try:
            with open(partial, "wb") as handle:
                handle.write(dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"cannot add message {final!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
    driver_name = SCHEME
    default_connection_params: dict[str, Any] = {}  # a folder has no host: kombu would warn about the missing one


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
