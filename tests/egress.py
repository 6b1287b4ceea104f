"""A small HTTP forward proxy on loopback for the egress tests (test helper): CONNECT only,
tunnelling bytes both ways, recording the targets it was asked for (what an egress
proxy logs: host and port) and the Proxy-Authorization it got, and, when given
credentials, answering 407 to a CONNECT without them, as a company proxy does."""

from __future__ import annotations

import asyncio
import base64
import contextlib


class ConnectProxy:
    """A small HTTP forward proxy on loopback: CONNECT only, tunnels bytes both ways, and
    records the targets it was asked for (what an egress proxy logs: host and port)."""

    def __init__(self, refuse: bool = False, credentials: str | None = None) -> None:
        self.targets: list[str] = []
        self.refuse = refuse
        # "USER:PASSWORD" this proxy requires (Proxy-Authorization: Basic), or None.
        self.credentials = credentials
        self.authorizations: list[str | None] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
        self.targets.append(f"{method} {target}")
        fields = dict(
            line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line
        )
        given = {k.lower(): v for k, v in fields.items()}.get("proxy-authorization")
        self.authorizations.append(given)
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if given != expected:
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="egress"\r\nContent-Length: 0\r\n\r\n'
                )
                writer.close()
                return
        if self.refuse or method != "CONNECT":
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
