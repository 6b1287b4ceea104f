"""The HTTP parsers this process serves on, checked before it serves.

The API listener parses requests with llhttp through httptools (`zrproxy.server`); the
admin listener runs on aiohttp, whose C parser is llhttp too. The corpus and
differential tests ran against those; aiohttp's pure-Python parser frames some
requests differently, so we refuse to start on it, or on an aiohttp older than the pin.
"""

from __future__ import annotations

import re

import aiohttp
import aiohttp.http_parser

from zrproxy.errors import StartupError

# The oldest aiohttp whose parser this module was checked against (pyproject.toml pins
# the same).
AIOHTTP_MIN = (3, 14)


def check_http_parser(
    version: str = aiohttp.__version__,
    parser: type = aiohttp.http_parser.HttpRequestParser,
) -> None:
    """Refuse to serve on aiohttp's pure-Python parser or an aiohttp older than the pin.

    aiohttp falls back to the pure-Python parser when AIOHTTP_NO_EXTENSIONS is set or
    its C extension is missing.
    """
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < AIOHTTP_MIN:
        raise StartupError(
            f"aiohttp {version} is older than {'.'.join(map(str, AIOHTTP_MIN))}, "
            "the oldest this proxy was checked against"
        )
    if parser is aiohttp.http_parser.HttpRequestParserPy:
        raise StartupError(
            "aiohttp runs its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS is set or its "
            "C extension is missing); zrproxy serves only on the C parser (llhttp)"
        )
