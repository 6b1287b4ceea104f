"""A child process that makes a marker and frees it, and a count of what is left.

Shared by the hardening proof (scrubbed: no freed copy) and the benchmark experiment
`bench.scrub_settings` (which setting is needed on this machine's CPU and glibc).

The child gets a seed and derives the marker itself, so the marker never crosses the
process boundary and is in no source text: every copy found is one the child made.
Objects cover each allocator path: pymalloc, tcache, the malloc heap, UCS-2.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Literal

from tests.memscan import count_occurrences, wait_until_sleeping
from tests.processes import LoggedProcess
from zrproxy.hardening import scrub_environment

Mode = Literal["churn", "first-call", "hold"]
VARIANTS = ("scrubbed", "control", "MALLOC_PERTURB_ only", "pymalloc", "lazy binding")

SCRUB_CHILD = """
import hashlib, os, sys

def make(seed):
    marker = hashlib.sha256(seed.encode()).hexdigest()
    small = ("s:" + marker).encode()
    medium = ("m:" + marker).encode() + bytes(900)
    large = b"L" * 40_000 + marker.encode() + b"l" * 40_000
    wide = "w:\\u20ac" + marker
    return [small, medium, large, wide]

held = make(sys.argv[1])
if sys.argv[2] != "hold":
    del held
if sys.argv[2] == "first-call":
    # The process's first call of libc's write(): bound lazily unless LD_BIND_NOW.
    os.write(1, b"ready\\n")
    os.read(0, 1)
else:
    # Churn in smaller size classes (2-tuples, ints): it reuses no freed marker block.
    churn = [(i, -i) for i in range(50_000)]
    del churn
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    sys.stdin.readline()
"""


def _without(env: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in keys}


def variant_env(name: str, base: dict[str, str]) -> dict[str, str]:
    """`base` (an environment without any scrub setting) scrubbed, or missing one part."""
    scrubbed = scrub_environment(base)
    if name == "scrubbed":
        return scrubbed
    if name == "control":
        return base
    if name == "MALLOC_PERTURB_ only":  # perturb on, tcache on
        return {**_without(scrubbed, "GLIBC_TUNABLES"), "MALLOC_PERTURB_": "165"}
    if name == "pymalloc":
        return _without(scrubbed, "PYTHONMALLOC")
    assert name == "lazy binding", name
    return _without(scrubbed, "LD_BIND_NOW")


def copies_left(env: dict[str, str], mode: Mode) -> int:
    """How many copies of the child's marker its memory holds once it is idle."""
    seed = os.urandom(16).hex()
    marker = hashlib.sha256(seed.encode()).hexdigest().encode()
    child = LoggedProcess([sys.executable, "-c", SCRUB_CHILD, seed, mode], env, stdin=True)
    try:
        child.wait_for("^ready$")
        wait_until_sleeping(child.pid)
        return count_occurrences(child.pid, [marker], wide=True)[marker]
    finally:
        child.stop(10)
