"""The third-party caches we clear still exist under the names we clear them by."""

from __future__ import annotations

import yarl
import yarl._url

from zrproxy import caches


def test_every_yarl_url_cache_we_rely_on_exists() -> None:
    assert len(caches._URL_CACHES) == len(caches.URL_CACHE_NAMES)


def test_forgetting_drops_a_parsed_request_url() -> None:
    marker = "q=" + "cache-marker-1234"
    url = yarl.URL.build(path="/v1/x", query_string=marker, encoded=True)
    assert yarl._url.build_pre_encoded_url.cache_info().currsize > 0
    del url
    caches.forget_request_urls()
    for name in caches.URL_CACHE_NAMES:
        assert getattr(yarl._url, name).cache_info().currsize == 0
