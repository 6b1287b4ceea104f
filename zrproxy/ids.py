"""Request ids: 128 unpredictable bits each, without a system call per request.

# Strategy
`secrets.token_hex` asks the kernel (getrandom) for every id: 3-5 % of a non-streaming
request's CPU in the profile (bench/README.md). Instead, take 4 KiB from os.urandom (the
kernel's CSPRNG) at a time and cut 16 bytes per id: one system call per 256 ids. The ids
are still the kernel's random bytes, not the output of a generator we seed, so one id
says nothing about the next; what is buffered is only future ids, never content. A
forked child must not hand out its parent's buffered ids: the buffer is emptied after
fork.
"""

from __future__ import annotations

import os

_ID_BYTES = 16
_BATCH = 256 * _ID_BYTES


class _Ids:
    __slots__ = ("_buffer", "_next")

    def __init__(self) -> None:
        self._buffer = b""
        self._next = 0

    def new(self) -> str:
        start = self._next
        if start + _ID_BYTES > len(self._buffer):
            self._buffer = os.urandom(_BATCH)
            start = 0
        self._next = start + _ID_BYTES
        return self._buffer[start : start + _ID_BYTES].hex()

    def reset(self) -> None:
        self._buffer = b""
        self._next = 0


_IDS = _Ids()
os.register_at_fork(after_in_child=_IDS.reset)
new_id = _IDS.new
