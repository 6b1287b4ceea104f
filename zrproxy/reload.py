"""SIGHUP: read the config again, validate it whole, and only then apply it.

A config that does not parse or validate leaves the running one in place, and the log
line names the key path and the problem (never a value). Settings that belong to the
process itself (its listeners, worker count, memory modes) cannot change without a
restart: a reload that changes them is refused the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from zrproxy.config import Config
from zrproxy.errors import ConfigError

log = logging.getLogger("zrproxy")

# [server] keys fixed for the life of the process.
FIXED_AT_START = ("listen", "admin_listen", "workers", "scrub_memory", "allocator", "mlock")


def check_reloadable(running: Config, new: Config) -> None:
    for name in FIXED_AT_START:
        if getattr(running.server, name) != getattr(new.server, name):
            raise ConfigError(f"server.{name}", "cannot change on reload; restart to apply")


def reload_on_sighup(
    running: Callable[[], Config],
    load: Callable[[], Config],
    apply: Callable[[Config], Awaitable[None]],
) -> None:
    """On each SIGHUP: `load()`, check it against `running()`, then `apply()` it.

    Reloads run one at a time; a SIGHUP during a reload starts another one after it.
    """
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        async with lock:
            try:
                new = load()
                check_reloadable(running(), new)
            except ConfigError as exc:
                log.error("config reload refused, the running config stays: %s", exc)
                return
            await apply(new)
            log.info("config reloaded")

    def on_signal() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_signal)
