"""Request ids: distinct, 128 bits of hex, fresh after a fork, few system calls."""

from __future__ import annotations

import os

import pytest

from zrproxy import ids
from zrproxy.headers import request_id


def test_ids_are_distinct_128_bit_hex() -> None:
    seen = {request_id(None) for _ in range(5000)}
    assert len(seen) == 5000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in seen)


def test_one_urandom_call_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(ids.os, "urandom", counting)
    ids._IDS.reset()
    for _ in range(512):
        ids.new_id()
    assert len(calls) == 2


def test_a_forked_child_does_not_reuse_the_parents_ids() -> None:
    ids.new_id()  # the buffer now holds the parent's next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, ids.new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != ids.new_id()
