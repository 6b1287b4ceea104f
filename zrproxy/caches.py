"""Process-wide caches of third-party libraries that could keep request content alive.

yarl memoises parsed URLs in module-level LRU caches (128 entries each), and aiohttp's
HTTP parser builds every request target through them, so a query string or an unknown
path would stay in memory until 128 other URLs pushed it out. We cannot stop aiohttp
from parsing the target, so we clear those caches after any request whose target is not
one of our fixed endpoint paths. The names are private to yarl: `test_caches.py` fails
if they disappear, so an upgrade cannot silently turn this into a no-op.
"""

from __future__ import annotations

from collections.abc import Callable

import yarl._url

URL_CACHE_NAMES = ("encode_url", "pre_encoded_url", "build_pre_encoded_url", "from_parts")
_URL_CACHES: tuple[Callable[[], None], ...] = tuple(
    getattr(yarl._url, name).cache_clear
    for name in URL_CACHE_NAMES
    if hasattr(getattr(yarl._url, name, None), "cache_clear")
)


def forget_request_urls() -> None:
    """Drop every URL yarl has memoised (cheap: a few dicts of at most 128 entries)."""
    for clear in _URL_CACHES:
        clear()
