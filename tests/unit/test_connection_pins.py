"""The aiohttp internals zrproxy/connection.py relies on still exist as it uses them."""

from __future__ import annotations

import asyncio
import inspect

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, _ErrInfo


def test_parser_errors_are_queued_as_err_info() -> None:
    info = _ErrInfo(status=431, exc=ValueError(), message="")
    assert (info.status, info.message) == (431, "")


async def test_request_handler_attributes_we_touch() -> None:
    handler = RequestHandler(web.Server(lambda r: None), loop=asyncio.get_running_loop())  # type: ignore[arg-type, return-value]
    for name in ("_messages", "_waiter", "_keepalive_handle", "_request_count", "_parser"):
        assert hasattr(handler, name), name
    assert handler.max_line_size == 8190 and handler.max_headers == 128
    params = list(inspect.signature(RequestHandler._handle_request).parameters)
    assert params[:2] == ["self", "request"]
    source = inspect.getsource(RequestHandler.data_received)
    assert "self._request_count += 1" in source and "self._messages.append" in source
    # The connection loop's head-deadline test relies on aiohttp re-arming keep-alive only
    # after a response, and the parser being built with these keyword arguments.
    init = inspect.getsource(RequestHandler.__init__)
    for kwarg in ("max_line_size=", "max_field_size=", "max_headers=", "max_msg_queue_size="):
        assert kwarg in init, kwarg
