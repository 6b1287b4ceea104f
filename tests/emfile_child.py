"""A child process whose loop runs out of file descriptors with a connection waiting
(test helper for tests/e2e/test_fd_limit_loops.py): it listens with zrproxy's
`AcceptErrors` handler, fills its descriptor table, and reports what its loop did.

Protocol on stdin/stdout, one line each: it prints its port; the parent says "fill";
it fills the table and prints "full"; the parent connects and says "go"; the child
waits until its loop reported a refused accept (the standard loop) or 2 s, frees the
descriptors, waits for the connection to be served (at most 3 s) and prints
`{"refused": N, "served": N}`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop

from zrproxy.listener import AcceptErrors


async def _main() -> None:
    loop = asyncio.get_running_loop()
    refused: list[bool] = []
    loop.set_exception_handler(AcceptErrors(refused.append, None))
    served: list[int] = []

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(1)
        writer.write(b"served")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    readline = sys.stdin.readline
    await loop.run_in_executor(None, readline)  # "fill" (the executor's thread is up)
    hog: list[int] = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print("full", flush=True)
    await loop.run_in_executor(None, readline)  # "go": the parent has connected
    for _ in range(40):
        if refused:
            break
        await asyncio.sleep(0.05)
    for fd in hog:
        os.close(fd)
    for _ in range(60):
        if served:
            break
        await asyncio.sleep(0.05)
    print(json.dumps({"refused": len(refused), "served": len(served)}), flush=True)
    server.close()


if __name__ == "__main__":
    factory = uvloop.new_event_loop if sys.argv[1] == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_main())
