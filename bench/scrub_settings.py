"""`python -m bench.scrub_settings`: which scrub-mode setting is needed on this machine.

An experiment, not a test: whether freed copies survive without one setting depends on
the CPU (how the dynamic linker saves vector registers on lazy binding), on glibc's
allocator and on Python's. Each variant is a child that makes a marker, frees it and
idles; the figure is how many copies another process still reads in its memory. Also
prints the count for the real proxy in default mode after traffic on every path (freed
memory that scrub mode exists to wipe). The proof that scrubbed leaves 0 is in the suite.

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import tempfile
from pathlib import Path

import aiohttp

from tests.memscan import count_occurrences, wait_until_sleeping
from tests.processes import mock_process, proxy_process
from tests.scrub_child import VARIANTS, Mode, copies_left, variant_env
from tests.traffic import drive_every_path, retention_config
from zrproxy.auth import new_key

# Which child mode shows each setting's effect (see tests/scrub_child.py).
_MODES: dict[str, Mode] = {
    "scrubbed": "churn",
    "control": "churn",
    "MALLOC_PERTURB_ only": "churn",  # tcache-sized frees skip the perturb fill
    "pymalloc": "churn",  # pymalloc never hands small frees to glibc
    "lazy binding": "first-call",  # _dl_runtime_resolve may spill registers to the stack
}


def _base_env() -> dict[str, str]:
    drop = ("PYTHONMALLOC", "GLIBC_TUNABLES", "MALLOC_PERTURB_", "LD_BIND_NOW", "ZRPROXY_SCRUBBED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    return env


async def _proxy_default_mode_copies() -> int:
    key, digest = new_key()
    marker = ("zrSCAN", secrets.token_hex(12))
    needle = "".join(marker).encode()
    with tempfile.TemporaryDirectory() as tmp, mock_process() as mock:
        with proxy_process(retention_config(mock.url, digest), Path(tmp)) as proxy:
            async with aiohttp.ClientSession() as client:
                await drive_every_path(proxy.url, key, marker, client)
                wait_until_sleeping(proxy.pid)
                return count_occurrences(proxy.pid, [needle], wide=True)[needle]


def main() -> None:
    libc = " ".join(platform.libc_ver())
    print(f"machine: {platform.machine()} {platform.processor()}, libc {libc}")
    print("| child variant | mode | freed copies found |")
    print("|---|---|---|")
    base = _base_env()
    for name in VARIANTS:
        mode = _MODES[name]
        print(f"| {name} | {mode} | {copies_left(variant_env(name, base), mode)} |")
    copies = asyncio.run(_proxy_default_mode_copies())
    print(
        f"\nzrproxy in default mode, after traffic on every path: {copies} copies in freed memory"
    )


if __name__ == "__main__":
    main()
