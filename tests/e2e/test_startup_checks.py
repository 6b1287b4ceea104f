"""The proxy refuses to start on aiohttp's pure-Python parser or an aiohttp older than
the pin, with a startup error that says which."""

from __future__ import annotations

import os
import subprocess
import sys

import aiohttp.http_parser
import pytest

from zrproxy.connection import check_http_parser
from zrproxy.errors import StartupError


def test_the_installed_aiohttp_passes() -> None:
    check_http_parser()


def test_an_older_aiohttp_is_refused() -> None:
    with pytest.raises(StartupError, match=r"aiohttp 3\.13\.2 is older than 3\.14"):
        check_http_parser(version="3.13.2")


def test_the_pure_python_parser_is_refused() -> None:
    with pytest.raises(StartupError, match="pure-Python HTTP parser"):
        check_http_parser(parser=aiohttp.http_parser.HttpRequestParserPy)


def test_serve_exits_2_when_aiohttp_extensions_are_off() -> None:
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "zrproxy", "serve", "--listen", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"startup error: aiohttp runs its pure-Python HTTP parser" in done.stderr
