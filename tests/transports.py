"""A recording asyncio transport, for the tests that drive a protocol (our server's or
the upstream connection's) read by read, where a socket would not let a test choose
where reads split."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class RecordingTransport(asyncio.Transport):
    """Keeps what is written and whether reading is paused or the transport closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.paused = False
        self.pauses = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for piece in data:
            self.write(piece)

    def get_write_buffer_size(self) -> int:
        return 0  # everything written has left our buffer

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False
