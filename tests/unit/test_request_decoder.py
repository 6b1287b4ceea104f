"""The one JSON decoder every request body goes through keeps nothing between calls."""

from __future__ import annotations

import gc
import json

import pytest

from zrproxy import dialects
from zrproxy.errors import MalformedJSON


def _scanner_state() -> list[object]:
    return gc.get_referents(dialects._DECODER.scan_once)


def test_the_shared_decoder_keeps_no_key_of_a_body_it_parsed() -> None:
    marker = "retention-marker-" + "7" * 12
    body = json.dumps({"model": "m", marker: {marker + "-nested": [1, 2]}}).encode()
    parsed = dialects.parse_request(body)
    assert marker in parsed.payload
    del parsed
    memos = [ref for ref in _scanner_state() if isinstance(ref, dict)]
    assert memos  # the scanner's key memo is there to look at
    assert all(not memo for memo in memos)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32-le"])
def test_bodies_decode_as_json_loads_decodes_them(encoding: str) -> None:
    body = json.dumps({"model": "m", "x": "é"}, ensure_ascii=False).encode(encoding)
    assert dialects.parse_request(body).payload == json.loads(body)


@pytest.mark.parametrize("body", [b"\xff\xfe\xfa", b'{"model": NaN}', b"[1]", b"{"])
def test_what_json_loads_refuses_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedJSON):
        dialects.parse_request(body)
