"""The one supervision loop for every served model, whatever its lifecycle: a worker's own
server (``process.ServedProcess``) or its share of the node's (``node.NodeServer``).

Each lifecycle says whether its server is down (``down()``: it exited, or failed
``nemocc.serve.health-failures-before-restart`` health checks in a row, counted by a
``HealthWatch``) and restarts it when it may (``restart()``: within ``max_restarts``; for a node's
server, once under the node's lock); this loop does the rest, the same way for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from nemocc_dask.config import setting
from nemocc_dask.errors import StartError

logger = logging.getLogger(__name__)


class ServeError(StartError):
    """A served model could not be started; the message has its log's last lines."""


class Supervised(Protocol):
    """A served model as the loop sees it."""

    url: str

    async def down(self) -> str | None:
        """Why the server is down ("exited", "stopped answering"), or None while it is up or
        still starting."""

    async def restart(self, why: str) -> bool:
        """Start it again if this lifecycle may (True when it did)."""

    async def wait_healthy(self) -> None:
        """Until it answers; ServeError if it exits or does not answer in time."""


class HealthWatch:
    """Failed health checks in a row since the last start."""

    def __init__(self) -> None:
        self.failures = 0

    def saw(self, healthy: bool) -> bool:
        """Count one check; True once enough have failed in a row to call the server down."""
        self.failures = 0 if healthy else self.failures + 1
        return self.failures >= setting("serve.health-failures-before-restart")

    def reset(self) -> None:
        self.failures = 0


async def supervise_once(server: Supervised) -> None:
    """Check ``server`` once; restart it if it is down and may be restarted, then wait until it
    answers (a restart that does not come up is left to the next check and to the pool's
    failure budget)."""
    why = await server.down()
    if why is None or not await server.restart(why):
        return
    with contextlib.suppress(ServeError):
        await server.wait_healthy()


async def supervise(servers: list[Supervised]) -> None:
    """Check every server each ``nemocc.serve.health-poll-seconds``, for ever (cancel to stop)."""
    while True:
        await asyncio.sleep(setting("serve.health-poll-seconds"))
        for server in servers:
            await supervise_once(server)
